-- The Lua linter's settings for the Redis scripts (src/store/redis/*.lua); CI runs
-- `luacheck src/store/redis`. At run time every script is the schema's header
-- (src/store/schema.rs, `lua_header`), then prelude.lua, then the script itself
-- (src/store/redis/mod.rs, `script`): each file is checked alone, with the names
-- the parts before it define declared here. A unit test in schema.rs checks that
-- the schema's tables below match the schema.
std = "lua51"
max_line_length = false
read_globals = {
  "redis", "cjson", "KEYS",
  -- The prelude takes the store's clock off its end.
  ARGV = { other_fields = true, read_only = false },
  -- The schema's header:
  K = { fields = { JOB = {}, AGGR = {}, PENDING = {}, READY = {}, RATEWAIT = {}, PENDING_N = {}, PENDING_TOTAL = {}, WAKE = {}, RATE = {}, DL_DELAYED = {}, DL_LEASES = {}, CB_DELAYED = {}, CB_LEASES = {}, CB_QUEUE = {}, CB_FAILED = {}, DELETIONS = {}, HOST_PAUSE = {}, HOST_PAUSES = {}, HOST_SLOTS = {}, HOST_WAIT = {}, HOST_RATE = {}, CB_WAIT = {}, STATS = {}, } },
  F = { fields = { SPEC = {}, AGGR = {}, HAS_CB = {}, URL_HOST = {}, CREATED_AT = {}, DL_STATE = {}, DL_ATTEMPTS = {}, DL_LEASE = {}, DL_LOST = {}, DL_ERROR = {}, DL_PAUSES = {}, STARTED_AT = {}, FINISHED_AT = {}, RESPONSE_CODE = {}, IMAGE_SIZE = {}, THUMBS = {}, NEXT_AT = {}, WAIT = {}, HOST = {}, HOST_WAIT = {}, HOST_SLOT = {}, CB_STATE = {}, CB_ATTEMPTS = {}, CB_LEASE = {}, CB_LOST = {}, CB_ERROR = {}, CB_AT = {}, CB_WAIT = {}, CB_DEFERS = {}, DL_LEASE_EXP = {}, CB_LEASE_EXP = {}, DL_DELAYED_AT = {}, CB_DELAYED_AT = {}, DEL_AT = {}, FAILED_AT = {}, CB_WAIT_SEQ = {}, } },
  A = { fields = { LIMIT = {}, INFLIGHT = {}, PROXY = {}, RATE = {}, BURST = {}, JOBS = {}, } },
  S = { fields = { PENDING = {}, IN_PROGRESS = {}, SUCCESS = {}, FAILED = {}, } },
  W = { fields = { AGGR_RATE = {}, HOST_PAUSED = {}, HOST_RATE = {}, HOST_CONCURRENCY = {}, } },
  C = { fields = { MAX_LOST_LEASES = {}, BATCH = {}, READY_TRIES = {}, ABANDONED_KEEP_MS = {}, EXPIRY_SLACK_MS = {}, WAKE_TOKENS = {}, UNPARK_TRIES = {}, WAKE_LOOK_FACTOR = {}, HOST_WAIT_TTL_MS = {}, CB_WAIT_TTL_MS = {}, FAILED_BATCH = {}, GCRA_SLACK = {}, GCRA_SLACK_MAX_MS = {}, } },
  -- The names per queue (schema.rs, `PerQueue`).
  Q = { fields = { dl = { other_fields = true }, cb = { other_fields = true } } },
  -- The prelude's names:
  "P", "CLOCK", "EXPIRY_SLACK", "now_ms", "n2s", "pause_left", "wake", "refresh", "free_slot",
  "end_job", "revive", "gcra", "unpark", "free_host", "enqueue_callback",
}
-- The prelude defines what the scripts use: unused there is expected.
files["src/store/redis/prelude.lua"] = { ignore = { "211" } }
