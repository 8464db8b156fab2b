//! The request path as routes see it. `path_prefix` is compared with the path after dot-segment
//! removal (RFC 3986 §5.2.4), and that normalised path is what the backend receives, so a
//! route exposes only what its prefix names: `/chat/../admin` is `/admin`, never `/chat/`.
//!
//! Percent-escapes are not decoded (a backend decodes them itself), so the escapes that a
//! decoding backend would turn into path structure the gateway did not see are refused:
//! `%2e` in a dot-segment (`/chat/%2e%2e/admin`), `%2f` and `%5c` anywhere, a raw `\`, and a
//! dot-segment followed by `;` parameters (`/chat/..;/admin`, which servlet containers read
//! as `..`).

use std::borrow::Cow;
use std::fmt;

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    EncodedSeparator,
    Backslash,
    EncodedDotSegment,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EncodedSeparator => "percent-encoded '/' or '\\' in the request path",
            Self::Backslash => "'\\' in the request path",
            Self::EncodedDotSegment => {
                "percent-encoded or parameterised '.' or '..' segment in the request path"
            }
        })
    }
}

/// The path routes match and backends receive. Only an origin-form path (starting with `/`)
/// is normalised; anything else (`*`, an absolute URI) is returned as it is and matches no
/// prefix. Allocates only when there is a dot-segment to remove.
pub fn normalise(path: &str) -> Result<Cow<'_, str>, PathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Ok(Cow::Borrowed(path));
    };
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    let bytes = path.as_bytes();
    let mut dots = false;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let escaped = bytes.get(i + 1..i + 3).map(<[u8]>::to_ascii_lowercase);
            match escaped.as_deref() {
                Some(b"2f" | b"5c") => return Err(PathError::EncodedSeparator),
                Some(b"2e") => dots = true,
                _ => {}
            }
        } else if b == b'.' || b == b';' {
            dots = true;
        }
    }
    if !dots {
        return Ok(Cow::Borrowed(path));
    }
    let mut removed = false;
    for segment in rest.split('/') {
        match segment {
            "." | ".." => removed = true,
            _ if is_dot_segment(segment.split(';').next().unwrap_or(segment)) => {
                return Err(PathError::EncodedDotSegment);
            }
            _ => {}
        }
    }
    if !removed {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(remove_dot_segments(rest)))
}

/// [`normalise`] for a request target: the path normalised, the query kept as it is.
pub fn normalise_target(target: &str) -> Result<Cow<'_, str>, PathError> {
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    Ok(match (normalise(path)?, query) {
        (Cow::Borrowed(_), _) => Cow::Borrowed(target),
        (Cow::Owned(path), None) => Cow::Owned(path),
        (Cow::Owned(path), Some(query)) => Cow::Owned(format!("{path}?{query}")),
    })
}

/// Whether a segment is `.` or `..` once `%2e` is decoded.
fn is_dot_segment(segment: &str) -> bool {
    let mut dots = 0;
    let bytes = segment.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'.' {
            i += 1;
        } else if bytes[i..].len() >= 3 && bytes[i..i + 3].eq_ignore_ascii_case(b"%2e") {
            i += 3;
        } else {
            return false;
        }
        dots += 1;
    }
    matches!(dots, 1 | 2)
}

/// RFC 3986 §5.2.4 for an absolute path given without its leading `/`.
fn remove_dot_segments(rest: &str) -> String {
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.into_iter().enumerate() {
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            other => {
                out.push(other);
                continue;
            }
        }
        // A path ending in a dot-segment names a directory: `/a/b/..` is `/a/`.
        if i == last {
            out.push("");
        }
    }
    let mut path = String::with_capacity(rest.len() + 1);
    path.push('/');
    path.push_str(&out.join("/"));
    path
}

#[cfg(test)]
mod tests {
    use super::{PathError, normalise};

    fn ok(path: &str) -> String {
        normalise(path).unwrap().into_owned()
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(ok("/chat/../../admin"), "/admin");
        assert_eq!(ok("/chat/./room"), "/chat/room");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/.."), "/");
        assert_eq!(ok("/a//../b"), "/a/b");
        assert_eq!(ok("/a/../"), "/");
        assert_eq!(ok("/"), "/");
    }

    #[test]
    fn a_targets_query_is_kept_and_not_normalised() {
        assert_eq!(
            super::normalise_target("/chat/../admin?next=/../x").unwrap(),
            "/admin?next=/../x"
        );
        assert_eq!(
            super::normalise_target("/chat?a=%2f").unwrap(),
            "/chat?a=%2f"
        );
    }

    #[test]
    fn ordinary_paths_are_borrowed_unchanged() {
        for path in [
            "/",
            "/chat/room-1",
            "/a.b/c..d/...",
            "/a;b=1/c",
            "/x%20y",
            "*",
        ] {
            assert!(matches!(normalise(path), Ok(std::borrow::Cow::Borrowed(p)) if p == path));
        }
    }

    #[test]
    fn escapes_that_would_change_the_structure_are_refused() {
        for path in [
            "/chat/%2e%2e/admin",
            "/chat/.%2E/admin",
            "/chat/%2e/x",
            "/chat/..;/admin",
        ] {
            assert_eq!(normalise(path), Err(PathError::EncodedDotSegment), "{path}");
        }
        for path in ["/chat%2f..%2fadmin", "/chat/%5C..", "/a%2Fb"] {
            assert_eq!(normalise(path), Err(PathError::EncodedSeparator), "{path}");
        }
        assert_eq!(normalise("/chat\\..\\admin"), Err(PathError::Backslash));
    }
}
