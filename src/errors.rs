//! Walking an error's chain: what reqwest, hyper and tower wrap (in boxed errors and
//! `io::Error`s) is found, and a chain is written as one message.

/// The first `T` in `e`'s chain, looking inside boxed errors and `io::Error`s (hyper
/// and reqwest wrap the resolver's, the redirect policy's and rustls' errors in both).
pub fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    fn inside<'a, T: std::error::Error + 'static>(
        c: &'a (dyn std::error::Error + 'static),
    ) -> Option<&'a T> {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        let inner: &(dyn std::error::Error + 'static) =
            c.downcast_ref::<std::io::Error>()?.get_ref()?;
        inside(inner)
    }
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = inside(c) {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

/// The error and its causes, joined with `: ` (a cause already in the text is left
/// out), for messages.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let cs = c.to_string();
        if !s.contains(&cs) {
            s.push_str(": ");
            s.push_str(&cs);
        }
        cur = c.source();
    }
    s
}
