//! The one socket option Pingora does not expose: `TCP_CORK`.

/// Set or clear `TCP_CORK` on a TCP socket; `false` if the call failed (the
/// write then simply goes out in two segments, as without corking).
#[allow(unsafe_code)]
pub fn set_cork(fd: i32, on: bool) -> bool {
    let value: libc::c_int = i32::from(on);
    // SAFETY: `fd` is the descriptor of a socket owned by a live Pingora
    // session that the caller borrows for the whole call; setsockopt only
    // reads `size_of::<c_int>()` bytes from `&value`, which outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}
