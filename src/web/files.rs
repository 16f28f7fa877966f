//! `/files/` under `serve`: the storage root through `ServeDir`, which by itself
//! follows symlinks wherever they point. In front of it, every `GET`/`HEAD` is
//! resolved under the root the way `ServeDir` resolves it and canonicalized (every
//! symlink followed); only a regular file whose real path is inside the root's real
//! path is handed on, anything else is a JSON 404. So a symlink in the storage
//! directory to `/etc/passwd` or to a directory outside is never served, while a
//! symlink inside the root to a file inside the root is (it exposes nothing the
//! root does not). Directories are never served (no index pages, no redirects).
//!
//! Remaining race: between the check and `ServeDir`'s open, someone who can write
//! to the storage directory could swap a checked path component for a symlink.
//! That needs local write access to the storage root (this service never makes
//! symlinks: ids are checked and files are written under fixed names and renamed);
//! closing it would need serving the very descriptor opened with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, which `ServeDir` cannot do.

use std::convert::Infallible;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;
use tower_http::services::ServeDir;

use super::ApiError;

/// The service nested at `/files`: `root`'s regular files, none outside it.
pub fn service(
    root: PathBuf,
) -> impl tower::Service<
    Request<Body>,
    Response = Response,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let dir = ServeDir::new(&root).append_index_html_on_directories(false);
    let root = Arc::new(root);
    tower::service_fn(move |req: Request<Body>| {
        let (dir, root) = (dir.clone(), root.clone());
        async move {
            if matches!(*req.method(), Method::GET | Method::HEAD)
                && !may_serve(&root, req.uri().path()).await
            {
                return Ok(ApiError(StatusCode::NOT_FOUND, "no such file".into()).into_response());
            }
            let Ok(res) = dir.oneshot(req).await;
            Ok(res.map(Body::new))
        }
    })
}

/// Where `ServeDir` looks for `uri_path` under `root`: leading slashes trimmed,
/// percent-decoded (as UTF-8), `.` skipped; `None` (refused) for `..`, an absolute
/// path or a component that is not a plain name once decoded (`a%2F..`).
pub fn requested_path(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path.trim_start_matches('/'))
        .decode_utf8()
        .ok()?;
    let mut path = root.to_path_buf();
    for c in Path::new(&*decoded).components() {
        match c {
            Component::Normal(name) => {
                if !Path::new(name)
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
                {
                    return None;
                }
                path.push(name);
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(path)
}

/// Whether `uri_path` names a regular file whose real path is inside `root`'s.
pub async fn may_serve(root: &Path, uri_path: &str) -> bool {
    let Some(path) = requested_path(root, uri_path) else {
        return false;
    };
    let (Ok(root), Ok(real)) = (
        tokio::fs::canonicalize(root).await,
        tokio::fs::canonicalize(&path).await,
    ) else {
        return false;
    };
    real.starts_with(&root) && tokio::fs::metadata(&real).await.is_ok_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn paths_resolve_as_serve_dir_resolves_them() {
        let root = Path::new("/srv/files");
        assert_eq!(
            requested_path(root, "/abc/abcdef"),
            Some(PathBuf::from("/srv/files/abc/abcdef"))
        );
        assert_eq!(
            requested_path(root, "//a/./b%20c"),
            Some(PathBuf::from("/srv/files/a/b c"))
        );
        for bad in [
            "/../x",
            "/a/../../x",
            "/%2e%2e/x",
            "/..%2fx",
            "/a%2f..%2f..%2fx",
            "/%2fetc%2fpasswd",
            "/%ff",
        ] {
            assert_eq!(requested_path(root, bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn symlinks_out_of_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("files");
        std::fs::create_dir_all(root.join("abc")).unwrap();
        std::fs::write(root.join("abc/abcdef"), "stored").unwrap();
        std::fs::write(dir.path().join("secret"), "secret").unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/f"), "outside").unwrap();
        symlink(dir.path().join("secret"), root.join("abc/to-secret")).unwrap();
        symlink("/etc/passwd", root.join("passwd")).unwrap();
        symlink(dir.path().join("outside"), root.join("out")).unwrap();
        symlink("../..", root.join("abc/up")).unwrap();
        symlink(root.join("abc/abcdef"), root.join("inside")).unwrap();
        symlink("abcdef", root.join("abc/rel")).unwrap();

        // Through a symlink that leaves the root and comes back: the file is inside.
        for ok in [
            "/abc/abcdef",
            "/inside",
            "/abc/rel",
            "/abc/./abcdef",
            "/abc/up/files/abc/abcdef",
        ] {
            assert!(may_serve(&root, ok).await, "{ok}");
        }
        for refused in [
            "/abc/to-secret",
            "/passwd",
            "/out/f",
            "/out",
            "/abc/up/secret",
            "/abc",
            "/",
            "/missing",
            "/../secret",
        ] {
            assert!(!may_serve(&root, refused).await, "{refused}");
        }
        // A root that is itself a symlink is followed once: its files are inside.
        let link_root = dir.path().join("root-link");
        symlink(&root, &link_root).unwrap();
        assert!(may_serve(&link_root, "/abc/abcdef").await);
        assert!(!may_serve(&link_root, "/passwd").await);
    }
}
