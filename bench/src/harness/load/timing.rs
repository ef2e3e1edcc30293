//! What the generator asks of the kernel, and the latency arithmetic on its answers: arrival
//! stamps (`SO_TIMESTAMPNS`) and placing them on the monotonic clock, a level-triggered epoll set
//! with nanosecond waits, and timer slack.

use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Asks the kernel to stamp the arrival of everything `stream` receives (see [`recv_stamped`]).
/// Where it cannot, reads are timed as they happen.
pub(super) fn stamp_arrivals(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: the descriptor is open; `on` is a c_int that outlives the call.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A level-triggered epoll set with nanosecond waits.
pub(super) struct Epoll(OwnedFd);

impl Epoll {
    pub(super) fn new() -> std::io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new descriptor.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(super) fn add(&self, stream: &TcpStream, slot: usize) -> std::io::Result<()> {
        let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: slot as u64 };
        // SAFETY: both descriptors are open; `event` lives across the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_ADD, stream.as_raw_fd(), &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `stream` for writability too, or no longer.
    pub(super) fn watch(&self, stream: &TcpStream, slot: usize, writable: bool) -> std::io::Result<()> {
        let events = if writable { libc::EPOLLIN | libc::EPOLLOUT } else { libc::EPOLLIN };
        let mut event = libc::epoll_event { events: events as u32, u64: slot as u64 };
        // SAFETY: both descriptors are open; `event` lives across the call.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_MOD, stream.as_raw_fd(), &mut event) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    pub(super) fn remove(&self, stream: &TcpStream) {
        // SAFETY: both descriptors are open; a null event is allowed for EPOLL_CTL_DEL.
        unsafe {
            libc::epoll_ctl(self.0.as_raw_fd(), libc::EPOLL_CTL_DEL, stream.as_raw_fd(), std::ptr::null_mut());
        }
    }

    /// Waits at most `timeout` for readiness; returns how many of `events` were filled.
    pub(super) fn wait(&self, events: &mut [libc::epoll_event], timeout: Duration) -> usize {
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
        // SAFETY: `events` is writable for its length; `ts` outlives the call; no signal mask.
        let n = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                &ts as *const libc::timespec,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        n.max(0) as usize
    }
}

/// Reads what `fd` holds into `buf`: the byte count and, where the kernel attached one, the
/// wall-clock time in ns at which the last of those bytes arrived.
pub(super) fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<i128>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // Room for one control message holding a timespec, aligned as a cmsghdr must be.
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control) until filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (over `buf`) and `control`, all of which outlive the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled, within msg_controllen;
    // SCM_TIMESTAMPNS carries a timespec, read unaligned as the data may not be.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                stamp = Some(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n as usize, stamp))
}

pub(super) fn wall_clock_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128)
}

/// When an answer arrived, on the monotonic clock: `now` less the age of its arrival stamp
/// `stamp_ns`, `now_wall_ns` being the wall clock read with `now`. The stamp is on the wall clock,
/// which may be stepped; a stamp that does not fall between `sent` and `now` is not believed,
/// and `now` stands in, as it does where there is no stamp.
pub(super) fn arrival(now: Instant, now_wall_ns: i128, stamp_ns: Option<i128>, sent: Instant) -> Instant {
    let Some(age) = stamp_ns.map(|stamp| now_wall_ns - stamp).and_then(|age| u64::try_from(age).ok()) else {
        return now;
    };
    match now.checked_sub(Duration::from_nanos(age)) {
        Some(arrived) if arrived >= sent => arrived,
        _ => now,
    }
}

/// How long the request waited for its connection, past its due time.
pub(super) fn previous_wait(free_at: Instant, due: Instant) -> Duration {
    free_at.saturating_duration_since(due)
}

/// Asks the kernel to wake this thread's sleeps within `ns` of their time, rather than the
/// default 50 µs, so that the schedule is kept at microsecond resolution.
pub(crate) fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and touches only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn the_kernel_stamps_when_an_answer_arrived() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        stamp_arrivals(&client);
        let (mut server, _) = listener.accept().unwrap();
        // The kernel turns stamping on from a work item, soon after the first socket asks.
        std::thread::sleep(Duration::from_millis(50));
        let before = wall_clock_ns();
        server.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
        // Read well after the bytes arrived: the stamp is their arrival, not the read.
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 256];
        let (n, stamp) = recv_stamped(client.as_raw_fd(), &mut buf).unwrap();
        let read = wall_clock_ns();
        assert_eq!(n, 38);
        let stamp = stamp.expect("loopback TCP carries SO_TIMESTAMPNS stamps");
        assert!(before <= stamp && stamp + 40_000_000 < read, "{before} {stamp} {read}");
    }

    #[test]
    fn an_arrival_is_placed_on_the_monotonic_clock_when_it_can_be_believed() {
        let sent = Instant::now();
        let now = sent + Duration::from_micros(500);
        let wall = 1_000_000_000_000i128;
        // Stamped 200 µs before `now`: arrived 300 µs after sending.
        assert_eq!(arrival(now, wall, Some(wall - 200_000), sent), sent + Duration::from_micros(300));
        // No stamp, a stamp from before the send or from the future (the wall clock was stepped
        // between): the read's time stands in.
        assert_eq!(arrival(now, wall, None, sent), now);
        assert_eq!(arrival(now, wall, Some(wall - 600_000), sent), now);
        assert_eq!(arrival(now, wall, Some(wall + 1), sent), now);
    }
}
