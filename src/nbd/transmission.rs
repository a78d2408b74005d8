//! The transmission phase of one connection: parse requests, run them concurrently, send the
//! replies as they complete.
//!
//! One task drives the whole connection with an explicit poll loop ([`Session::poll_run`]):
//!
//! - **reading**: request headers are parsed from a buffered stream (one `read` syscall usually
//!   brings in many small requests) and WRITE payloads are read straight into engine buffers. The
//!   parser keeps its progress in [`ReadState`], so it can stop at any byte and resume;
//! - **executing**: each checked request becomes a future in a `FuturesUnordered`; many run at
//!   once and complete in any order. Refused requests are answered without running anything;
//! - **writing**: every reply that is ready goes out in one vectored write (headers and data
//!   buffers to the kernel without copying), resumed where the socket stopped taking bytes.
//!
//! Doing all three in one task instead of a task per request plus a writer task avoids a wakeup
//! and a cross-thread handoff per request: with the page cache warm, a 4 KiB read is parsed,
//! served and answered without the connection task ever sleeping.
//!
//! Memory is bounded per connection by [`Limits`]: a request is admitted only while the requests
//! in flight (received, not yet answered) and their payload bytes stay under the limits, and its
//! buffers are allocated only once it is admitted. When the budget is used up the connection
//! stops reading, so a client that pipelines without limit or never reads its replies is held
//! back by TCP flow control instead of growing the server.
//!
//! Engine requests are never cancelled: once started, a request runs to completion even if the
//! client is gone or the server gives up delivering replies (the futures are polled until they
//! finish; their replies are dropped).

use super::commands::{Conn, Refusal, Reply};
use super::proto::*;
use super::server::{Token, Tracker};
use crate::buf::IoBufMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// Bytes charged for any request on top of its payload (future, reply headers).
const REQUEST_OVERHEAD: usize = 4096;
/// Extra charge for a BLOCK_STATUS reply (up to `status::MAX_EXTENTS` extents per context).
const BLOCK_STATUS_COST: usize = 256 << 10;
/// Slices per `writev` (the kernel's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;
/// Requests parsed per turn of the loop before replies get a chance to go out.
const READS_PER_TURN: usize = 64;
/// READs at least this large run as their own task: the copy from the page cache then proceeds on
/// another core while the connection task keeps sending replies (small READs are cheaper inline).
const SPAWN_READ_LEN: u64 = 128 << 10;
/// Largest BLOCK_STATUS payload (extended headers) read: the effect length and context ids.
const MAX_STATUS_PAYLOAD: u64 = 4096;
/// Largest WRITE payload skipped to keep the stream in sync; a larger one ends the connection.
const MAX_SKIP: u64 = 1 << 32;
/// READ buffers kept for reuse per connection: at most this many bytes...
const POOL_BYTES: usize = 32 << 20;
/// ... and this many buffers.
const POOL_BUFFERS: usize = 256;

/// Per-connection limits on what is in flight.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests received and not yet answered.
    pub requests: usize,
    /// Payload bytes (plus a fixed overhead per request) of those requests. A single request is
    /// always admitted when nothing else is in flight, whatever its size.
    pub bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests: 512,
            bytes: 32 << 20,
        }
    }
}

/// Levels of the server's stop signal (a `watch` channel).
pub const RUNNING: u8 = 0;
/// Stop reading requests; answer those received.
pub const STOP: u8 = 1;
/// Stop delivering replies too (they cannot be delivered in time); finish running requests.
pub const ABANDON: u8 = 2;

/// Why the request loop ended.
#[derive(Debug)]
pub enum End {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection.
    ClientGone,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the framing (bad magic): the stream cannot be resynchronized.
    Violation(String),
    /// Reading or writing the socket failed.
    Io(io::Error),
}

/// Serves requests until the client disconnects, the server stops or an error breaks the
/// connection. Returns once every request received has finished running.
pub async fn serve<R, W>(
    conn: Arc<Conn>,
    reader: R,
    writer: W,
    limits: Limits,
    stop: watch::Receiver<u8>,
    tracker: Tracker,
) -> End
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
{
    let mut s = Session {
        conn: conn.clone(),
        reader,
        writer,
        limits,
        tracker,
        stop: StopSignal::new(stop),
        header_len: if conn.neg.extended {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        },
        rstate: ReadState::Header {
            buf: [0; EXTENDED_REQUEST_LEN],
            filled: 0,
        },
        reading: true,
        end: None,
        inflight: FuturesUnordered::new(),
        queue: VecDeque::new(),
        front_written: 0,
        in_requests: 0,
        in_bytes: 0,
        deliver: true,
        scratch: Vec::new(),
        pool: BufPool::default(),
    };
    std::future::poll_fn(|cx| s.poll_run(cx)).await;
    if s.deliver {
        let _ = s.writer.shutdown().await;
    }
    s.end.unwrap_or(End::ClientGone)
}

/// Wakes the connection when the server's stop level changes.
struct StopSignal {
    rx: watch::Receiver<u8>,
    changed: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

impl StopSignal {
    fn new(rx: watch::Receiver<u8>) -> Self {
        StopSignal { rx, changed: None }
    }

    /// The current level; registers for a wakeup on the next change.
    fn poll_level(&mut self, cx: &mut Context<'_>) -> u8 {
        loop {
            let fut = self.changed.get_or_insert_with(|| {
                let mut rx = self.rx.clone();
                Box::pin(async move { rx.changed().await.is_ok() })
            });
            match fut.as_mut().poll(cx) {
                Poll::Ready(true) => {
                    // The clone that saw the change is gone; mark the change seen on `rx` too,
                    // or the next clone (made from `rx`'s old version) would see the same change
                    // again at once, and this loop would spin forever on the executor thread.
                    self.rx.borrow_and_update();
                    self.changed = None;
                }
                // The server dropped the sender: never wake again.
                Poll::Ready(false) => {
                    self.changed = Some(Box::pin(std::future::pending()));
                }
                Poll::Pending => break,
            }
        }
        *self.rx.borrow()
    }
}

/// Where the request parser is.
enum ReadState {
    /// Reading a request header (of the negotiated style's length).
    Header {
        buf: [u8; EXTENDED_REQUEST_LEN],
        filled: usize,
    },
    /// A request whose admission waits for the budget.
    Admit(Request),
    /// Reading the payload of an admitted WRITE (or of a BLOCK_STATUS with extended headers).
    Payload {
        req: Request,
        buf: IoBufMut,
        filled: usize,
    },
    /// Reading and dropping the payload of an oversized WRITE or BLOCK_STATUS.
    Skip { req: Request, left: u64 },
}

/// A finished request: its reply and what it cost.
struct Done {
    reply: Reply,
    cost: usize,
}

type Running = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Unwraps a read of at least one byte, or returns from the parser: `Pending` stays pending,
/// end of stream and errors end reading.
macro_rules! read_or_return {
    ($e:expr) => {
        match $e {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(End::ClientGone)),
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(End::Io(e))),
            Poll::Pending => return Poll::Pending,
        }
    };
}

struct Session<R, W> {
    conn: Arc<Conn>,
    /// Request header length: compact or extended.
    header_len: usize,
    reader: R,
    writer: W,
    limits: Limits,
    tracker: Tracker,
    stop: StopSignal,
    rstate: ReadState,
    reading: bool,
    end: Option<End>,
    inflight: FuturesUnordered<Running>,
    /// Replies ready to send, in order; the first may be partly written.
    queue: VecDeque<Done>,
    front_written: usize,
    in_requests: usize,
    in_bytes: usize,
    /// False once replies can no longer be delivered (socket error, server gave up).
    deliver: bool,
    scratch: Vec<u8>,
    pool: BufPool,
}

/// READ buffers of finished replies, kept for the next READs of the same size: reusing them
/// avoids an allocation, a memset and, for large buffers, the page faults of fresh memory (the
/// allocator returns freed large blocks to the kernel) on every request.
#[derive(Default)]
struct BufPool {
    free: std::collections::HashMap<usize, Vec<IoBufMut>>,
    bytes: usize,
    count: usize,
}

impl BufPool {
    /// A buffer of exactly `len` bytes with arbitrary content.
    fn take(&mut self, len: usize) -> IoBufMut {
        match self.free.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => {
                self.bytes -= len;
                self.count -= 1;
                b
            }
            None => IoBufMut::for_overwrite(len),
        }
    }

    fn put(&mut self, b: IoBufMut) {
        let len = b.len();
        if len == 0 || self.bytes + len > POOL_BYTES || self.count >= POOL_BUFFERS {
            return;
        }
        self.bytes += len;
        self.count += 1;
        self.free.entry(len).or_default().push(b);
    }
}

impl<R, W> Session<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;

            let level = self.stop.poll_level(cx);
            if level >= STOP && self.reading {
                self.stop_reading(End::Shutdown);
            }
            if level >= ABANDON && self.deliver {
                self.stop_delivering();
            }

            while let Poll::Ready(Some(done)) = self.inflight.poll_next_unpin(cx) {
                progress = true;
                if self.deliver {
                    self.queue.push_back(done);
                } else {
                    self.retire(done);
                }
            }

            if self.deliver && !self.queue.is_empty() {
                match self.poll_write(cx) {
                    Poll::Ready(Ok(n)) => progress |= n > 0,
                    Poll::Ready(Err(e)) => {
                        tracing::debug!("nbd: writing replies: {e}");
                        self.stop_reading(End::Io(e));
                        self.stop_delivering();
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }

            if self.reading {
                for _ in 0..READS_PER_TURN {
                    match self.poll_request(cx) {
                        Poll::Ready(Ok(true)) => progress = true,
                        Poll::Ready(Ok(false)) | Poll::Pending => break,
                        Poll::Ready(Err(end)) => {
                            self.stop_reading(end);
                            progress = true;
                            break;
                        }
                    }
                }
            }

            if !self.reading && self.inflight.is_empty() && self.queue.is_empty() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn stop_reading(&mut self, end: End) {
        if self.reading {
            self.reading = false;
            self.end = Some(end);
            // A request admitted but not fully received is abandoned (it was never answered).
            if let ReadState::Payload { req, .. } | ReadState::Skip { req, .. } = &self.rstate {
                let cost = self.cost(req);
                self.release(cost);
            }
            self.rstate = ReadState::Header {
                buf: [0; EXTENDED_REQUEST_LEN],
                filled: 0,
            };
        }
    }

    fn stop_delivering(&mut self) {
        self.deliver = false;
        while let Some(d) = self.queue.pop_front() {
            self.retire(d);
        }
        self.front_written = 0;
    }

    /// Forgets a finished request: its budget and its buffer are free again.
    fn retire(&mut self, d: Done) {
        self.release(d.cost);
        if let Some(b) = d.reply.buf {
            self.pool.put(b);
        }
    }

    fn release(&mut self, cost: usize) {
        self.in_requests -= 1;
        self.in_bytes -= cost;
    }

    /// What a request costs in the byte budget.
    fn cost(&self, req: &Request) -> usize {
        REQUEST_OVERHEAD
            + match req.cmd {
                CMD_READ | CMD_WRITE if req.len <= MAX_PAYLOAD as u64 => req.len as usize,
                CMD_BLOCK_STATUS => BLOCK_STATUS_COST,
                _ => 0,
            }
    }

    /// Advances the parser by one step. `Ok(true)`: progress was made; `Ok(false)`: blocked on
    /// the budget; `Err`: reading ends.
    fn poll_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, End>> {
        match &mut self.rstate {
            ReadState::Header { buf, filled } => {
                let hlen = self.header_len;
                while *filled < hlen {
                    let n = read_or_return!(poll_read_some(
                        &mut self.reader,
                        cx,
                        &mut buf[*filled..hlen]
                    ));
                    *filled += n;
                }
                let decoded = if hlen == EXTENDED_REQUEST_LEN {
                    Request::decode_extended(buf)
                } else {
                    let mut compact = [0u8; REQUEST_LEN];
                    compact.copy_from_slice(&buf[..REQUEST_LEN]);
                    Request::decode(&compact)
                };
                let req = match decoded {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!("nbd: closing connection: request header: {e}");
                        return Poll::Ready(Err(End::Violation(e.to_string())));
                    }
                };
                if req.cmd == CMD_DISC {
                    return Poll::Ready(Err(End::Disconnect));
                }
                self.rstate = ReadState::Admit(req);
                Poll::Ready(Ok(true))
            }
            ReadState::Admit(req) => {
                let req = *req;
                let cost = self.cost(&req);
                let busy = self.in_requests > 0
                    && (self.in_requests >= self.limits.requests
                        || self.in_bytes + cost > self.limits.bytes);
                if busy {
                    // Woken when a reply is written or a request finishes.
                    return Poll::Ready(Ok(false));
                }
                self.in_requests += 1;
                self.in_bytes += cost;
                let status_payload = req.cmd == CMD_BLOCK_STATUS
                    && self.conn.neg.extended
                    && req.flags & CMD_FLAG_PAYLOAD_LEN != 0;
                let payload_max = if status_payload {
                    MAX_STATUS_PAYLOAD
                } else {
                    MAX_PAYLOAD as u64
                };
                if (req.cmd == CMD_WRITE || status_payload) && req.len > MAX_SKIP {
                    let cost = self.cost(&req);
                    self.release(cost);
                    return Poll::Ready(Err(End::Violation(format!(
                        "{} payload of {} bytes",
                        command_name(req.cmd),
                        req.len
                    ))));
                }
                self.rstate = if (req.cmd == CMD_WRITE || status_payload) && req.len > payload_max {
                    // Consumed to find the next request, never stored.
                    ReadState::Skip { req, left: req.len }
                } else if req.cmd == CMD_WRITE || status_payload {
                    ReadState::Payload {
                        req,
                        buf: IoBufMut::for_overwrite(req.len as usize),
                        filled: 0,
                    }
                } else {
                    let buf = (req.cmd == CMD_READ && req.len <= MAX_PAYLOAD as u64)
                        .then(|| self.pool.take(req.len as usize));
                    self.dispatch(req, buf, cost);
                    ReadState::Header {
                        buf: [0; EXTENDED_REQUEST_LEN],
                        filled: 0,
                    }
                };
                Poll::Ready(Ok(true))
            }
            ReadState::Payload { req, buf, filled } => {
                while *filled < buf.len() {
                    let n =
                        read_or_return!(poll_read_some(&mut self.reader, cx, &mut buf[*filled..]));
                    *filled += n;
                }
                let req = *req;
                let old = std::mem::replace(
                    &mut self.rstate,
                    ReadState::Header {
                        buf: [0; EXTENDED_REQUEST_LEN],
                        filled: 0,
                    },
                );
                if let ReadState::Payload { buf, .. } = old {
                    let cost = self.cost(&req);
                    self.dispatch(req, Some(buf), cost);
                }
                Poll::Ready(Ok(true))
            }
            ReadState::Skip { req, left } => {
                if self.scratch.is_empty() {
                    self.scratch = vec![0u8; 64 << 10];
                }
                while *left > 0 {
                    let k = (*left).min(self.scratch.len() as u64) as usize;
                    let n = read_or_return!(poll_read_some(
                        &mut self.reader,
                        cx,
                        &mut self.scratch[..k]
                    ));
                    *left -= n as u64;
                }
                let req = *req;
                self.rstate = ReadState::Header {
                    buf: [0; EXTENDED_REQUEST_LEN],
                    filled: 0,
                };
                let cost = self.cost(&req);
                self.dispatch(req, None, cost);
                Poll::Ready(Ok(true))
            }
        }
    }

    /// Answers a refused request at once, or starts a checked one.
    fn dispatch(&mut self, req: Request, payload: Option<IoBufMut>, cost: usize) {
        if req.cmd == CMD_BLOCK_STATUS && req.flags & CMD_FLAG_PAYLOAD_LEN != 0 {
            return self.dispatch_status_payload(req, payload, cost);
        }
        if let Err(r) = self.conn.check(&req) {
            let mut reply = self.conn.error_reply(&req, &r);
            if req.cmd == CMD_READ {
                reply.buf = payload; // back to the pool with the reply
            }
            self.queue.push_back(Done { reply, cost });
            return;
        }
        let conn = self.conn.clone();
        let token: Token = self.tracker.token();
        let run = async move {
            let reply = conn.execute(req, payload).await;
            drop(token);
            Done { reply, cost }
        };
        if req.cmd == CMD_READ && req.len >= SPAWN_READ_LEN {
            // Not cancelled if the handle is dropped; a panic becomes an EIO reply.
            let task = tokio::spawn(run);
            let conn = self.conn.clone();
            self.inflight.push(Box::pin(async move {
                match task.await {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::error!("nbd: READ task failed: {e}");
                        let r = Refusal {
                            err: NbdError::Io,
                            msg: "internal error".into(),
                        };
                        Done {
                            reply: conn.error_reply(&req, &r),
                            cost,
                        }
                    }
                }
            }));
        } else {
            self.inflight.push(Box::pin(run));
        }
    }

    /// A BLOCK_STATUS with a payload (extended headers): the payload (absent if it was too large
    /// and skipped) names the effect length and the contexts to answer for.
    fn dispatch_status_payload(&mut self, req: Request, payload: Option<IoBufMut>, cost: usize) {
        let parsed = match &payload {
            Some(p) => self.conn.status_payload(&req, p),
            None => Err(Refusal {
                err: NbdError::Inval,
                msg: format!("block status payload of {} bytes is too long", req.len),
            }),
        };
        let (plain, ids) = match parsed.and_then(|(plain, ids)| {
            self.conn.check(&plain)?;
            Ok((plain, ids))
        }) {
            Ok(x) => x,
            Err(r) => {
                let reply = self.conn.error_reply(&req, &r);
                self.queue.push_back(Done { reply, cost });
                return;
            }
        };
        let conn = self.conn.clone();
        let token: Token = self.tracker.token();
        self.inflight.push(Box::pin(async move {
            let reply = conn.block_status(&plain, Some(&ids)).await;
            drop(token);
            Done { reply, cost }
        }));
    }

    /// Writes as much of the queued replies as the socket takes. Returns the bytes written.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut total = 0;
        while !self.queue.is_empty() {
            let n = {
                let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(64);
                let mut skip = self.front_written;
                'fill: for d in &self.queue {
                    for p in &d.reply.parts {
                        let b = d.reply.bytes(p);
                        if skip >= b.len() {
                            skip -= b.len();
                            continue;
                        }
                        slices.push(IoSlice::new(&b[skip..]));
                        skip = 0;
                        if slices.len() == MAX_IOV {
                            break 'fill;
                        }
                    }
                }
                if slices.is_empty() {
                    0
                } else {
                    match Pin::new(&mut self.writer).poll_write_vectored(cx, &slices) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending if total > 0 => break,
                        Poll::Pending => return Poll::Pending,
                    }
                }
            };
            total += n;
            // Retire the replies that are now completely written.
            let mut advanced = self.front_written + n;
            while let Some(front) = self.queue.front() {
                let len = front.reply.len();
                if advanced < len {
                    break;
                }
                advanced -= len;
                if let Some(d) = self.queue.pop_front() {
                    self.retire(d);
                }
            }
            self.front_written = advanced;
        }
        Poll::Ready(Ok(total))
    }
}

/// One `poll_read` into `buf`; returns the bytes read (0 at end of stream).
fn poll_read_some<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let mut rb = ReadBuf::new(buf);
    match Pin::new(r).poll_read(cx, &mut rb) {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

#[cfg(test)]
mod stop_signal_tests {
    use super::*;
    use std::task::Context;

    /// After the stop level changed once, polling it again must return (not spin) and must
    /// leave a wakeup registered for the next change.
    #[test]
    fn stop_level_seen_once_does_not_spin() {
        let (tx, rx) = watch::channel(RUNNING);
        let mut sig = StopSignal::new(rx);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(sig.poll_level(&mut cx), RUNNING);
        let _ = tx.send(STOP);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            let first = sig.poll_level(&mut cx);
            let second = sig.poll_level(&mut cx);
            let pending = sig
                .changed
                .as_mut()
                .map(|f| f.as_mut().poll(&mut cx).is_pending());
            let _ = done_tx.send((first, second, pending));
            drop(tx);
        });
        let got = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        assert_eq!(
            got.ok(),
            Some((STOP, STOP, Some(true))),
            "poll_level spun or missed the change"
        );
    }
}
