//! Group commit: the thread that owns every write transaction, applies the queued
//! steps in order in one transaction and commits once (see the module docs).

use super::tables::*;
use super::write::W;
use super::*;

/// One queued write step: a transaction body and where its answer goes.
pub(super) trait Op: Send {
    /// Runs the body in the batch's transaction, keeping its output. May run again
    /// in a fresh transaction when another step of the batch failed.
    fn apply(&mut self, w: &mut W<'_>) -> R<()>;
    /// Sends the kept output, or `err`; called once the batch is committed (or
    /// failed).
    fn reply(self: Box<Self>, err: Option<StoreError>);
}

pub(super) struct Step<T, F> {
    pub(super) body: F,
    pub(super) out: Option<T>,
    pub(super) reply: oneshot::Sender<Result<T>>,
}

impl<T, F> Op for Step<T, F>
where
    T: Send,
    F: FnMut(&mut W<'_>) -> R<T> + Send,
{
    fn apply(&mut self, w: &mut W<'_>) -> R<()> {
        self.out = Some((self.body)(w)?);
        Ok(())
    }

    fn reply(self: Box<Self>, err: Option<StoreError>) {
        let r = match (err, self.out) {
            (Some(e), _) => Err(e),
            (None, Some(v)) => Ok(v),
            (None, None) => Err(StoreError::Backend(
                "embedded store: write step was not run".into(),
            )),
        };
        // The caller may have gone away (its future dropped): nothing to tell.
        let _ = self.reply.send(r);
    }
}

/// The same error again, for each caller of a failed batch.
pub(super) fn dup(e: &StoreError) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
    }
}

pub(super) fn writer_stopped() -> StoreError {
    StoreError::Backend("embedded store: the writer thread stopped".into())
}

/// The thread that owns every write transaction (group commit).
pub(super) struct Writer {
    pub(super) db: Arc<Database>,
    pub(super) notify: Arc<[Notify; 2]>,
    pub(super) steps: mpsc::Receiver<Box<dyn Op>>,
    pub(super) cursor: String,
    pub(super) clock: Clock,
}

impl Writer {
    /// Until every sender is gone (the store was dropped) and the queue is drained:
    /// takes what is queued, up to `MAX_GROUP` steps, and commits it at once.
    pub(super) fn run(mut self) {
        while let Ok(first) = self.steps.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match self.steps.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // A panicking step drops the batch (its callers get an error) but not
            // the writer.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(|| self.batch(batch)));
        }
    }

    /// Applies `ops` in order in one transaction, commits once, then answers each and
    /// fires their wake-ups. A step that fails after writing is dropped from the
    /// batch (answered with its error) and the others run again in a fresh
    /// transaction, so that no partial step is ever committed.
    pub(super) fn batch(&mut self, mut ops: Vec<Box<dyn Op>>) {
        loop {
            let tx = match self.db.begin_write() {
                Ok(tx) => tx,
                Err(e) => return Self::fail_all(ops, Fail::from(e)),
            };
            let mut errs: Vec<Option<StoreError>> = Vec::with_capacity(ops.len());
            let mut wake = [0usize; 2];
            let mut dirty = false;
            let mut broken = None;
            {
                let mut w = match W::open(&tx, std::mem::take(&mut self.cursor), &self.clock) {
                    Ok(w) => w,
                    Err(e) => return Self::fail_all(ops, e),
                };
                for (i, op) in ops.iter_mut().enumerate() {
                    w.begin_step();
                    match op.apply(&mut w) {
                        Ok(()) => {
                            dirty |= w.dirty;
                            for (n, q) in wake.iter_mut().zip(w.wake) {
                                *n += usize::from(q);
                            }
                            errs.push(None);
                        }
                        // Failed before writing anything: only this step fails.
                        Err(Fail::Store(e)) if !w.dirty => errs.push(Some(e)),
                        Err(e) => {
                            broken = Some((i, e));
                            break;
                        }
                    }
                }
                self.cursor = std::mem::take(&mut w.cursor);
            }
            if let Some((i, e)) = broken {
                let _ = tx.abort();
                ops.remove(i).reply(Some(e.into()));
                if ops.is_empty() {
                    return;
                }
                continue;
            }
            let done = if dirty {
                tx.commit().map_err(Fail::from)
            } else {
                tx.abort().map_err(Fail::from)
            };
            if let Err(e) = done {
                return Self::fail_all(ops, e);
            }
            for (op, err) in ops.into_iter().zip(errs) {
                op.reply(err);
            }
            for (n, notify) in wake.iter().zip(self.notify.iter()) {
                for _ in 0..*n {
                    notify.notify_one();
                }
            }
            return;
        }
    }

    pub(super) fn fail_all(ops: Vec<Box<dyn Op>>, e: Fail) {
        let e = StoreError::from(e);
        for op in ops {
            op.reply(Some(dup(&e)));
        }
    }
}

pub(super) struct Inner {
    pub(super) db: Arc<Database>,
    pub(super) notify: Arc<[Notify; 2]>,
    /// To the writer thread; `None` once dropping.
    pub(super) steps: Option<mpsc::Sender<Box<dyn Op>>>,
    pub(super) writer: Option<thread::JoinHandle<()>>,
    pub(super) worker: String,
    pub(super) clock: Clock,
}

impl Drop for Inner {
    /// Closes the queue; the writer commits what is still queued, then exits.
    fn drop(&mut self) {
        self.steps.take();
        if let Some(h) = self.writer.take() {
            let _ = h.join();
        }
    }
}

impl Inner {
    pub(super) fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> R<T>) -> Result<T> {
        let tx = self.db.begin_read().map_err(Fail::from)?;
        Ok(f(&tx)?)
    }
}
