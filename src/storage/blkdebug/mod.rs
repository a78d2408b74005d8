//! QEMU's `blkdebug` driver: a layer between a qcow2 image and its file that fails requests
//! when told to, and that can impose a device's request limits.
//!
//! QEMU's test suite drives error paths with it: "once the driver has updated the L1 table,
//! fail the next write with `EIO`", "after the first data read, every read fails". Rules are
//! keyed on *events* the format driver announces at its steps (`l1_update`, `refblock_alloc`,
//! `read_aio`, ...; [`DebugEvent`]), not on request counts, so one rule describes the same
//! failure whatever the exact requests around it. qimg's qcow2 engine announces the same
//! events at the equivalent steps (through [`Storage::debug_event`], a no-op everywhere
//! else), which lets the same configuration files and options exercise qimg's failure
//! handling and compare its messages with QEMU's.
//!
//! The semantics are QEMU's, so that its tests mean the same here:
//! - an event activates its `inject-error` rules (for the current state) and deactivates those
//!   of the previous event that had any; from then on every request of the rule's I/O types
//!   (default: read, write, write-zeroes, discard, flush) that covers the rule's sector (or any
//!   request without one) fails with the rule's errno; a `once` rule is then removed;
//! - `set-state` rules move a state machine (starting at 1) that rules can be restricted to;
//! - `align` pads requests to that alignment (reads read more, writes read-modify-write, the
//!   unaligned ends of discards are dropped), `max-transfer` splits reads and writes,
//!   `opt-write-zero` turns write-zeroes smaller than it into written zeros and
//!   `max-write-zero`/`max-discard` split the rest, as QEMU's block layer does for a device
//!   with these limits.
//!
//! `cluster_free` is announced before clusters lose a reference to be freed: a table switched
//! out (snapshot table, a deleted snapshot's L1 table, unlinked tables) and the queued frees of
//! data and L2 clusters when a flush applies them (qimg frees those later than QEMU, which
//! frees them during the request). Rules and breakpoints on events qimg's drivers do not
//! announce (yet: `refblock_alloc`, `cluster_alloc`, `empty_image_prepare`, `reftable_update`,
//! the block layer's `pwritev*`, ...) are refused: they would never fire
//! ([`DebugEvent::announced`]).
//!
//! Breakpoints (qemu-io's `break EVENT TAG`, `wait_break`, `resume`, `remove_break`; through a
//! [`DebugHandle`]) hold the request that meets the event until it is resumed: the events are
//! announced from async code, and an event that hits a breakpoint returns a [`Suspension`] the
//! caller awaits (an event no rule names costs one lock). QEMU's concurrency tests (iotest
//! 046) use them to freeze a request at a chosen step, e.g. a write that has allocated its
//! cluster but not written its data, and check what other requests do meanwhile.
//!
//! Parts: `config` (rules and limits from files and options), this module (the node: events,
//! rules, limits, breakpoints; as storage below a format), `device` (the node above a
//! format).

mod config;
mod device;

pub use config::Config;
pub use device::{BlkdebugDevice, DeviceBelow};

use super::{Extent, IoFuture, Storage, StorageRef};
use crate::block::ZeroFlags;
use crate::buf::{IoBuf, IoBufMut};
use config::{Action, Rule};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

macro_rules! events {
    ($($variant:ident = $name:literal,)*) => {
        /// The steps of the qcow2 driver a `blkdebug` rule can be keyed on (QEMU's
        /// `BlkdebugEvent`, same names).
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DebugEvent {
            $($variant,)*
        }

        impl DebugEvent {
            const ALL: &'static [(DebugEvent, &'static str)] = &[$((DebugEvent::$variant, $name),)*];
        }
    };
}

events! {
    L1Update = "l1_update",
    L1GrowAllocTable = "l1_grow_alloc_table",
    L1GrowWriteTable = "l1_grow_write_table",
    L1GrowActivateTable = "l1_grow_activate_table",
    L2Load = "l2_load",
    L2Update = "l2_update",
    L2UpdateCompressed = "l2_update_compressed",
    L2AllocCowRead = "l2_alloc_cow_read",
    L2AllocWrite = "l2_alloc_write",
    ReadAio = "read_aio",
    ReadBackingAio = "read_backing_aio",
    ReadCompressed = "read_compressed",
    WriteAio = "write_aio",
    WriteCompressed = "write_compressed",
    VmstateLoad = "vmstate_load",
    VmstateSave = "vmstate_save",
    CowRead = "cow_read",
    CowWrite = "cow_write",
    ReftableLoad = "reftable_load",
    ReftableGrow = "reftable_grow",
    ReftableUpdate = "reftable_update",
    RefblockLoad = "refblock_load",
    RefblockUpdate = "refblock_update",
    RefblockUpdatePart = "refblock_update_part",
    RefblockAlloc = "refblock_alloc",
    RefblockAllocHookup = "refblock_alloc_hookup",
    RefblockAllocWrite = "refblock_alloc_write",
    RefblockAllocWriteBlocks = "refblock_alloc_write_blocks",
    RefblockAllocWriteTable = "refblock_alloc_write_table",
    RefblockAllocSwitchTable = "refblock_alloc_switch_table",
    ClusterAlloc = "cluster_alloc",
    ClusterAllocBytes = "cluster_alloc_bytes",
    ClusterFree = "cluster_free",
    FlushToOs = "flush_to_os",
    FlushToDisk = "flush_to_disk",
    PwritevRmwHead = "pwritev_rmw_head",
    PwritevRmwAfterHead = "pwritev_rmw_after_head",
    PwritevRmwTail = "pwritev_rmw_tail",
    PwritevRmwAfterTail = "pwritev_rmw_after_tail",
    Pwritev = "pwritev",
    PwritevZero = "pwritev_zero",
    PwritevDone = "pwritev_done",
    EmptyImagePrepare = "empty_image_prepare",
    L1ShrinkWriteTable = "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters = "l1_shrink_free_l2_clusters",
    CorWrite = "cor_write",
    ClusterAllocSpace = "cluster_alloc_space",
    None = "none",
}

impl DebugEvent {
    /// The event called `name` (QEMU's spelling).
    pub fn parse(name: &str) -> Option<DebugEvent> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(e, _)| *e)
    }

    /// Whether qimg's drivers announce this event. A rule on one they never announce would
    /// silently never fire: such rules are refused instead.
    pub fn announced(self) -> bool {
        matches!(
            self,
            DebugEvent::None
                | DebugEvent::ReadAio
                | DebugEvent::WriteAio
                | DebugEvent::L2Load
                | DebugEvent::L2Update
                | DebugEvent::L1Update
                | DebugEvent::RefblockLoad
                | DebugEvent::RefblockUpdatePart
                | DebugEvent::CorWrite
                | DebugEvent::ClusterFree
        )
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(e, _)| *e == self)
            .map_or("none", |(_, n)| n)
    }
}

/// The kinds of request a rule can fail (QEMU's `BlkdebugIOType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    fn parse(s: &str) -> Option<IoType> {
        Some(match s {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }

    /// QEMU's default: everything but block status.
    const DEFAULT_MASK: u8 = 0b01_1111;
}

/// The rules' runtime state.
struct State {
    /// QEMU's state machine, starting at 1.
    state: i64,
    /// Every rule ever added, by id (`once` rules and hit breakpoints leave: `None`).
    rules: Vec<Option<Rule>>,
    /// Rule ids in the order QEMU keeps its list (newest first).
    order: Vec<usize>,
    /// Rule ids: the `inject-error` rules the last event with any activated.
    active: Vec<usize>,
    /// Requests held at a breakpoint (newest first), with what releases each.
    suspended: Vec<(String, tokio::sync::oneshot::Sender<()>)>,
}

/// What prints the breakpoints' messages (`blkdebug: Suspended request 'A'`).
type Reporter = Arc<dyn Fn(&str) + Send + Sync>;

/// The state a node shares with its [`DebugHandle`]s.
struct Shared {
    state: Mutex<State>,
    /// Signalled when a request is suspended (for `wait_break`).
    changed: tokio::sync::Notify,
    reporter: Mutex<Option<Reporter>>,
}

impl Shared {
    /// Prints a breakpoint message. May be called with `state` locked (never the other way).
    fn report(&self, msg: &str) {
        let reporter = self.reporter.lock().clone();
        if let Some(r) = reporter {
            r(msg);
        }
    }
}

/// What waits for a breakpoint's request to be resumed, if the event suspended it.
pub type Suspension = Option<IoFuture<'static, ()>>;

/// Control of a `blkdebug` node's breakpoints from outside (qemu-io's `break`, `resume`,
/// `wait_break`, `remove_break`), as QEMU's `bdrv_debug_*` calls.
#[derive(Clone)]
pub struct DebugHandle(Arc<Shared>);

impl DebugHandle {
    /// Prints the node's breakpoint messages with `f` (QEMU prints them on standard output).
    pub fn set_reporter(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self.0.reporter.lock() = Some(Arc::new(f));
    }

    /// `break EVENT TAG`: the next request that meets `event` is suspended as `tag`.
    /// `Err(ENOENT)` for an unknown event, as QEMU.
    pub fn break_at(&self, event: &str, tag: &str) -> io::Result<()> {
        let event = DebugEvent::parse(event).ok_or_else(|| io::Error::from_raw_os_error(2))?;
        if !event.announced() {
            // ENOTSUP: the request it would hold never comes.
            return Err(io::Error::from_raw_os_error(95));
        }
        let mut st = self.0.state.lock();
        let id = st.rules.len();
        st.rules.push(Some(Rule {
            event,
            state: 0,
            action: Action::Suspend { tag: tag.into() },
        }));
        st.order.insert(0, id);
        Ok(())
    }

    /// `resume TAG`: releases the request suspended as `tag` (the most recent one).
    pub fn resume(&self, tag: &str) -> io::Result<()> {
        let waker = {
            let mut st = self.0.state.lock();
            let Some(pos) = st.suspended.iter().position(|(t, _)| t == tag) else {
                return Err(io::Error::from_raw_os_error(2));
            };
            st.suspended.remove(pos).1
        };
        self.0
            .report(&format!("blkdebug: Resuming request '{tag}'"));
        let _ = waker.send(());
        Ok(())
    }

    /// `remove_break TAG`: drops the breakpoints tagged `tag` and resumes every request
    /// suspended as `tag`.
    pub fn remove_break(&self, tag: &str) -> io::Result<()> {
        let removed = {
            let mut st = self.0.state.lock();
            let mut removed = false;
            for r in st.rules.iter_mut() {
                if matches!(r, Some(Rule { action: Action::Suspend { tag: t }, .. }) if t == tag) {
                    *r = None;
                    removed = true;
                }
            }
            removed
        };
        let mut resumed = false;
        while self.resume(tag).is_ok() {
            resumed = true;
        }
        if removed || resumed {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(2))
        }
    }

    pub fn is_suspended(&self, tag: &str) -> bool {
        self.0.state.lock().suspended.iter().any(|(t, _)| t == tag)
    }

    /// `wait_break TAG`: returns once a request is suspended as `tag` (never, if none is).
    pub async fn wait_suspended(&self, tag: &str) {
        loop {
            let changed = self.0.changed.notified();
            if self.is_suspended(tag) {
                return;
            }
            changed.await;
        }
    }
}

/// What a `blkdebug` node passes requests to: a file ([`StorageRef`], the node below a
/// format) or an open image ([`DeviceBelow`], the node above a format).
pub trait Below: Send + Sync + 'static {
    fn read(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>>;
    fn write(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>>;
    fn zero(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, io::Result<()>>;
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>>;
    fn flush(&self) -> IoFuture<'_, io::Result<()>>;
}

impl Below for StorageRef {
    fn read(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        self.read_at(buf, offset)
    }
    fn write(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        self.write_at(buf, offset)
    }
    fn zero(&self, offset: u64, len: u64, _: ZeroFlags) -> IoFuture<'_, io::Result<()>> {
        self.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Storage::discard(&**self, offset, len)
    }
    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Storage::flush(&**self)
    }
}

/// A `blkdebug` node: the rules and limits of a [`Config`] in front of `inner`. As storage
/// (`Blkdebug<StorageRef>`) it sits between a format and its file; as a device
/// ([`BlkdebugDevice`]) above an open image.
pub struct Blkdebug<B: Below = StorageRef> {
    pub(super) inner: B,
    cfg: Config,
    shared: Arc<Shared>,
    /// Read-modify-write cycles (for `align`) exclude each other and aligned writes.
    rmw: tokio::sync::RwLock<()>,
    /// Changes requested so far (QEMU's `write_gen`), and how many of them the last
    /// successful flush covered: a flush with nothing new to make durable does not reach the
    /// node (nor fail), as in QEMU's block layer.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

impl<B: Below> Blkdebug<B> {
    /// The node over `inner`. As in QEMU, opening it is the event `none`: rules on it are
    /// armed from the start.
    pub fn new(inner: B, cfg: Config) -> Blkdebug<B> {
        let rules: Vec<Option<Rule>> = cfg.rules.iter().cloned().map(Some).collect();
        let order = (0..rules.len()).collect();
        let node = Blkdebug {
            inner,
            cfg,
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    state: 1,
                    rules,
                    order,
                    active: Vec::new(),
                    suspended: Vec::new(),
                }),
                changed: tokio::sync::Notify::new(),
                reporter: Mutex::new(None),
            }),
            rmw: tokio::sync::RwLock::new(()),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        };
        // No breakpoint exists yet: nothing can be suspended.
        let _ = node.event(DebugEvent::None);
        node
    }

    /// Control of the node's breakpoints.
    pub fn handle(&self) -> DebugHandle {
        DebugHandle(self.shared.clone())
    }

    /// Whether a request of `iotype` over `[offset, offset+len)` fails, as QEMU's
    /// `rule_check`: the first active rule that matches decides.
    pub(super) fn check(&self, iotype: IoType, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.shared.state.lock();
        let found = st.active.iter().enumerate().find_map(|(pos, &i)| {
            let Some(Rule {
                action:
                    Action::InjectError {
                        iotypes,
                        errno,
                        once,
                        offset: at,
                    },
                ..
            }) = &st.rules[i]
            else {
                return None;
            };
            let covers = match at {
                None => true,
                Some(at) => len > 0 && *at >= offset && *at < offset + len,
            };
            (covers && iotypes & iotype.bit() != 0).then_some((pos, i, *errno, *once))
        });
        let Some((pos, i, errno, once)) = found else {
            return Ok(());
        };
        if errno == 0 {
            return Ok(());
        }
        if once {
            st.active.remove(pos);
            st.rules[i] = None;
        }
        Err(io::Error::from_raw_os_error(errno))
    }

    /// A write-like request ran (whatever its outcome): a later flush has something to do.
    fn wrote(&self) {
        self.write_gen.fetch_add(1, SeqCst);
    }

    pub(super) async fn write_req(&self, buf: IoBuf, offset: u64) -> io::Result<()> {
        let r = self.write_padded(buf, offset).await;
        self.wrote();
        r
    }

    pub(super) async fn zero_req(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let r = self.zero_range(offset, len, flags).await;
        self.wrote();
        r
    }

    pub(super) async fn discard_req(&self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.discard_range(offset, len).await;
        self.wrote();
        r
    }

    pub(super) async fn flush_req(&self) -> io::Result<()> {
        let current = self.write_gen.load(SeqCst);
        if self.flushed_gen.load(SeqCst) == current {
            return Ok(());
        }
        self.check(IoType::Flush, 0, 0)?;
        self.inner.flush().await?;
        self.flushed_gen.fetch_max(current, SeqCst);
        Ok(())
    }

    /// QEMU's `blkdebug_co_debug_event`: the event's rules for the current state act, in the
    /// order QEMU keeps them; the first `inject-error` rule among them replaces the active set;
    /// a breakpoint suspends the request (the caller awaits the returned suspension).
    pub fn event(&self, event: DebugEvent) -> Suspension {
        let mut waits = Vec::new();
        {
            let mut st = self.shared.state.lock();
            let mut new_state = st.state;
            let mut injections = 0;
            let order = st.order.clone();
            for id in order {
                let Some(rule) = &st.rules[id] else { continue };
                if rule.event != event || (rule.state != 0 && rule.state != st.state) {
                    continue;
                }
                match &rule.action {
                    Action::InjectError { .. } => {
                        injections += 1;
                        if injections == 1 {
                            st.active.clear();
                        }
                        st.active.insert(0, id);
                    }
                    Action::SetState { new_state: s } => new_state = *s,
                    Action::Suspend { tag } => {
                        let tag = tag.clone();
                        st.rules[id] = None;
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        // Said before the request can be seen as suspended: whoever waits for
                        // it (`wait_break`) and resumes it prints after this.
                        self.shared
                            .report(&format!("blkdebug: Suspended request '{tag}'"));
                        st.suspended.insert(0, (tag, tx));
                        waits.push(rx);
                    }
                }
            }
            st.state = new_state;
        }
        if waits.is_empty() {
            return None;
        }
        self.shared.changed.notify_waiters();
        Some(Box::pin(async move {
            for rx in waits {
                let _ = rx.await;
            }
        }))
    }

    pub(super) fn align(&self) -> u64 {
        self.cfg.align.max(1)
    }

    /// Reads `[offset, offset+len)` (aligned) in pieces of at most `max-transfer`.
    async fn read_aligned(&self, mut buf: IoBufMut, offset: u64) -> io::Result<IoBufMut> {
        let max = self.cfg.max_transfer;
        if max == 0 || buf.len() as u64 <= max {
            self.check(IoType::Read, offset, buf.len() as u64)?;
            return self.inner.read(buf, offset).await;
        }
        let mut done: Option<IoBufMut> = None;
        let mut at = offset;
        while !buf.is_empty() {
            let rest = buf.split_off((max as usize).min(buf.len()));
            self.check(IoType::Read, at, buf.len() as u64)?;
            let piece = self.inner.read(buf, at).await?;
            at += piece.len() as u64;
            match &mut done {
                Some(d) => d.unsplit(piece),
                None => done = Some(piece),
            }
            buf = rest;
        }
        Ok(done.unwrap_or(buf))
    }

    /// Writes `buf` (aligned) at `offset` in pieces of at most `max-transfer`.
    async fn write_aligned(&self, buf: IoBuf, offset: u64) -> io::Result<()> {
        let max = if self.cfg.max_transfer == 0 {
            buf.len().max(1)
        } else {
            self.cfg.max_transfer as usize
        };
        let mut pos = 0;
        while pos < buf.len() {
            let end = (pos + max).min(buf.len());
            let at = offset + pos as u64;
            self.check(IoType::Write, at, (end - pos) as u64)?;
            self.inner.write(buf.slice(pos..end), at).await?;
            pos = end;
        }
        Ok(())
    }

    /// The aligned range around `[offset, offset+len)`.
    fn widen(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.align();
        let start = offset / a * a;
        let end = (offset + len).div_ceil(a) * a;
        (start, end)
    }

    pub(super) async fn read_padded(&self, buf: IoBufMut, offset: u64) -> io::Result<IoBufMut> {
        let (start, end) = self.widen(offset, buf.len() as u64);
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_aligned(buf, offset).await;
        }
        let mut buf = buf;
        let bounce = self
            .read_aligned(IoBufMut::zeroed((end - start) as usize), start)
            .await?;
        let skip = (offset - start) as usize;
        let n = buf.len();
        buf.copy_from_slice(&bounce[skip..skip + n]);
        Ok(buf)
    }

    /// Writes `data` at `offset`, reading the surrounding aligned blocks first if it is not
    /// aligned (exclusively: no other write may change those blocks meanwhile).
    async fn write_padded(&self, data: IoBuf, offset: u64) -> io::Result<()> {
        let (start, end) = self.widen(offset, data.len() as u64);
        if start == offset && end == offset + data.len() as u64 {
            let _shared = self.rmw.read().await;
            return self.write_aligned(data, offset).await;
        }
        let _exclusive = self.rmw.write().await;
        let mut block = self
            .read_aligned(IoBufMut::zeroed((end - start) as usize), start)
            .await?;
        let skip = (offset - start) as usize;
        block[skip..skip + data.len()].copy_from_slice(&data);
        self.write_aligned(block.freeze(), start).await
    }

    /// Zeroes: what the write-zeroes alignment allows as write-zeroes requests (split at
    /// `max-write-zero`), the rest as written zeros, like QEMU's block layer.
    async fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> io::Result<()> {
        let align = self.align().max(self.cfg.opt_write_zero.max(1));
        let end = offset + len;
        let head_end = offset.div_ceil(align) * align;
        let tail_start = end / align * align;
        let whole = head_end == offset && tail_start == end && head_end < tail_start;
        if flags.fast_only && !whole {
            // Part of it would be written as zeros: not fast.
            return Err(io::Error::from_raw_os_error(95)); // ENOTSUP
        }
        if head_end >= tail_start {
            // No aligned block inside: all written as zeros.
            return self.write_padded(IoBuf::zeroed(len as usize), offset).await;
        }
        if head_end > offset {
            self.write_padded(IoBuf::zeroed((head_end - offset) as usize), offset)
                .await?;
        }
        let max = match self.cfg.max_write_zero {
            0 => u64::MAX,
            m => m / align * align,
        };
        let mut at = head_end;
        while at < tail_start {
            let n = (tail_start - at).min(max.max(align));
            self.check(IoType::WriteZeroes, at, n)?;
            {
                let _shared = self.rmw.read().await;
                self.inner.zero(at, n, flags).await?;
            }
            at += n;
        }
        if end > tail_start {
            self.write_padded(IoBuf::zeroed((end - tail_start) as usize), tail_start)
                .await?;
        }
        Ok(())
    }

    /// Discards the part of the range aligned to the request alignment (discards are
    /// advisory: QEMU drops the rest), in pieces that end at `opt-discard` boundaries and are
    /// at most `max-discard` long, as QEMU's block layer splits them.
    async fn discard_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let align = self.align();
        let start = offset.div_ceil(align) * align;
        let end = (offset + len) / align * align;
        let opt = self.cfg.opt_discard;
        let max = match self.cfg.max_discard {
            0 => u64::MAX,
            m => m,
        };
        let mut at = start;
        while at < end {
            let mut n = (end - at).min(max);
            if opt != 0 && at % opt != 0 {
                n = n.min(opt - at % opt);
            }
            self.check(IoType::Discard, at, n)?;
            self.inner.discard(at, n).await?;
            at += n;
        }
        Ok(())
    }
}

impl Storage for Blkdebug<StorageRef> {
    fn read_at(&self, buf: IoBufMut, offset: u64) -> IoFuture<'_, io::Result<IoBufMut>> {
        Box::pin(self.read_padded(buf, offset))
    }

    fn write_at(&self, buf: IoBuf, offset: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.write_req(buf, offset))
    }

    fn flush(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.flush_req())
    }

    fn len(&self) -> IoFuture<'_, io::Result<u64>> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let r = self.inner.set_len(len).await;
            self.wrote();
            r
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.zero_req(offset, len, ZeroFlags::default()))
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.discard_req(offset, len))
    }

    fn allocate(&self, offset: u64, len: u64) -> IoFuture<'_, io::Result<()>> {
        self.inner.allocate(offset, len)
    }

    fn allocated_bytes(&self) -> Option<u64> {
        self.inner.allocated_bytes()
    }

    fn hole_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<(bool, u64)>> {
        Box::pin(async move {
            self.check(IoType::BlockStatus, offset, max)?;
            self.inner.hole_at(offset, max).await
        })
    }

    fn extent_at(&self, offset: u64, max: u64) -> IoFuture<'_, io::Result<Extent>> {
        Box::pin(async move {
            self.check(IoType::BlockStatus, offset, max)?;
            self.inner.extent_at(offset, max).await
        })
    }

    fn release_locks(&self) {
        self.inner.release_locks()
    }

    fn protocol(&self) -> &'static str {
        "blkdebug"
    }

    fn debug_event(&self, event: DebugEvent) -> Suspension {
        self.event(event)
    }

    fn debug_handle(&self) -> Option<DebugHandle> {
        Some(self.handle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn node(pairs: &[(&str, &str)]) -> Blkdebug {
        let cfg = Config::from_options(&kv(pairs)).expect("config");
        Blkdebug::new(Arc::new(MemoryStorage::new()), cfg)
    }

    fn errno(r: io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    #[tokio::test]
    async fn an_event_arms_its_rules_until_another_event_with_rules() {
        let d = node(&[
            ("inject-error.0.event", "l2_load"),
            ("inject-error.1.event", "read_aio"),
            ("inject-error.1.errno", "28"),
            ("inject-error.1.iotype", "write"),
        ]);
        assert_eq!(errno(d.flush().await), None);
        d.debug_event(DebugEvent::L1Update); // no rule: nothing changes
        assert_eq!(errno(d.flush().await), None);
        d.debug_event(DebugEvent::L2Load);
        assert_eq!(
            errno(d.flush().await),
            None,
            "nothing written: the flush does not reach it"
        );
        assert_eq!(errno(d.write_at(IoBuf::zeroed(512), 0).await), Some(5));
        assert_eq!(errno(d.flush().await), Some(5));
        assert_eq!(errno(d.write_at(IoBuf::zeroed(512), 0).await), Some(5));
        d.debug_event(DebugEvent::ReadAio);
        assert_eq!(errno(d.write_at(IoBuf::zeroed(512), 0).await), Some(28));
        assert_eq!(errno(d.flush().await), None, "only writes fail now");
        assert_eq!(errno(d.write_at(IoBuf::zeroed(512), 0).await), Some(28));
    }

    #[tokio::test]
    async fn once_sector_and_state() {
        let d = node(&[
            ("inject-error.0.event", "write_aio"),
            ("inject-error.0.once", "on"),
            ("inject-error.0.sector", "8"),
            ("inject-error.0.state", "2"),
            ("set-state.0.event", "l1_update"),
            ("set-state.0.new_state", "2"),
        ]);
        d.debug_event(DebugEvent::WriteAio);
        assert_eq!(
            errno(d.write_at(IoBuf::zeroed(512), 4096).await),
            None,
            "state 1"
        );
        d.debug_event(DebugEvent::L1Update);
        d.debug_event(DebugEvent::WriteAio);
        assert_eq!(
            errno(d.write_at(IoBuf::zeroed(512), 0).await),
            None,
            "sector 8 not covered"
        );
        assert_eq!(errno(d.write_at(IoBuf::zeroed(512), 4096).await), Some(5));
        assert_eq!(
            errno(d.write_at(IoBuf::zeroed(512), 4096).await),
            None,
            "once"
        );
    }

    #[tokio::test]
    async fn config_file_and_limits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("blkdebug.conf");
        std::fs::write(
            &conf,
            "# comment\n\n[inject-error]\nevent = \"l2_update\"\nerrno = \"28\"\n",
        )
        .expect("write");
        let path = conf.display().to_string();
        let d = node(&[("config", &path), ("align", "4k"), ("max-transfer", "8k")]);
        d.write_at(IoBuf::copy_from(&[7u8; 100]), 5000)
            .await
            .expect("unaligned write");
        let back = d.read_at(IoBufMut::zeroed(20000), 0).await.expect("read");
        assert!(back[5000..5100].iter().all(|&b| b == 7));
        assert!(back[..5000].iter().chain(&back[5100..]).all(|&b| b == 0));
        let _ = d.debug_event(DebugEvent::L2Update);
        assert_eq!(errno(d.discard(0, 8192).await), Some(28));

        let bad = |pairs: &[(&str, &str)]| {
            Config::from_options(&kv(pairs))
                .expect_err("refused")
                .to_string()
        };
        assert!(bad(&[("align", "3")]).contains("Cannot meet constraints with align 3"));
        assert!(bad(&[("align", "4k"), ("max-transfer", "6k")]).contains("max-transfer 6144"));
        assert!(bad(&[("inject-error.0.errno", "5")]).contains("Missing event name"));
        let huge = i64::MAX.to_string();
        assert!(bad(&[
            ("inject-error.0.event", "none"),
            ("inject-error.0.sector", &huge)
        ])
        .contains("too large"));
        assert!(bad(&[
            ("inject-error.0.event", "none"),
            ("inject-error.0.errno", "-5")
        ])
        .contains("between 0 and 4095"));
        assert!(bad(&[("inject-error.0.event", "nope")]).contains("'nope'"));
        assert!(bad(&[("inject-error.0.event", "cluster_alloc")]).contains("not announced"));
        assert!(bad(&[("config", "/nonexistent/x")]).contains("Could not read blkdebug config"));
        std::fs::write(&conf, "event = \"x\"\n").expect("write");
        assert!(bad(&[("config", &path)]).contains(":1: no group defined"));
    }
}
