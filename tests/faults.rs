//! Storage failures: the engine on the fault-injecting wrapper (`storage::fault`).
//!
//! What every failure must leave behind:
//! - the request that met the failure returns an error (never a panic);
//! - after a failed flush the image is failed: later flushes and writes return `EIO` even when
//!   the storage would succeed again (Linux reports a failed writeback once), reads still work;
//! - the image, reopened on the storage without faults, passes the project's check and
//!   `qemu-img check` without corruption (leaks are allowed), and every write acknowledged
//!   before the last successful flush reads back.

mod common;

use common::*;
use proptest::prelude::*;
use qimg::block::{CacheMode, ZeroFlags};
use qimg::qcow2::{create, CreateOptions, Qcow2, Qcow2Options};
use qimg::storage::crash::{CrashPolicy, CrashStorage};
use qimg::storage::fault::{FaultError, FaultHandle, FaultStorage, OpKind};
use qimg::storage::memory::MemoryStorage;
use qimg::storage::StorageRef;
use qimg::{IoBuf, IoBufMut};
use std::sync::Arc;

const CLUSTER_BITS: u32 = 12;
const SIZE: u64 = 1 << 20;

async fn fresh_image() -> Arc<MemoryStorage> {
    let mem = Arc::new(MemoryStorage::new());
    let opts = CreateOptions {
        size: SIZE,
        cluster_size: 1 << CLUSTER_BITS,
        ..Default::default()
    };
    create(mem.clone(), &opts).await.expect("create");
    mem
}

/// Small caches so that eviction writes metadata back in the middle of a workload.
fn small_cache() -> Qcow2Options {
    Qcow2Options {
        l2_cache_size: Some(2 << CLUSTER_BITS),
        refcount_cache_size: Some(4 << CLUSTER_BITS),
        ..Default::default()
    }
}

async fn open_faulty(mem: &Arc<MemoryStorage>, opts: &Qcow2Options) -> (Qcow2, FaultHandle) {
    let fs = Arc::new(FaultStorage::new(mem.clone()));
    let h = fs.handle();
    let img = Qcow2::open(fs, "faulty".into(), opts, false, CacheMode::Writeback)
        .await
        .expect("open");
    (img, h)
}

/// Reopens the storage without the fault wrapper and checks it: the project's check and
/// `qemu-img check` find no corruption, and every byte of `durable` outside `touched` reads back.
async fn verify_on_good_storage(
    mem: &MemoryStorage,
    durable: &[u8],
    touched: &[bool],
) -> Result<(), String> {
    let bytes = mem.to_vec();
    let storage: StorageRef = Arc::new(MemoryStorage::from_bytes(&bytes));
    let img = open_read_only(storage, "reopened")
        .await
        .map_err(|e| format!("reopen failed: {e}"))?;
    match img.check().await {
        Ok(r) if r.corruptions == 0 && r.check_errors == 0 => {}
        Ok(r) => return Err(format!("check: {r:?}")),
        Err((r, e)) => return Err(format!("check failed: {e} ({r:?})")),
    }
    let data = img
        .read_at(0, IoBufMut::zeroed(SIZE as usize))
        .await
        .map_err(|e| format!("read failed: {e}"))?;
    for i in 0..SIZE as usize {
        if !touched[i] && data[i] != durable[i] {
            return Err(format!(
                "byte {i} was durable as {:#x} but reads {:#x}",
                durable[i], data[i]
            ));
        }
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let p = dir.path().join("reopened.qcow2");
    std::fs::write(&p, &bytes).map_err(|e| e.to_string())?;
    let (code, corruptions, _leaks, out) = qemu_check(&p);
    if corruptions > 0 || !(code == 0 || code == 3) {
        return Err(format!("qemu-img check rc={code}:\n{out}"));
    }
    Ok(())
}

fn errno(r: &qimg::Result<()>) -> Option<i32> {
    r.as_ref().err().map(|e| e.errno())
}

#[tokio::test]
async fn flush_after_failed_flush_fails_although_storage_recovered() {
    let mem = fresh_image().await;
    let (img, faults) = open_faulty(&mem, &Qcow2Options::default()).await;
    img.write_at(0, IoBuf::copy_from(&pattern(1, 8192)))
        .await
        .unwrap();
    img.flush().await.unwrap();
    img.write_at(65536, IoBuf::copy_from(&pattern(2, 8192)))
        .await
        .unwrap();
    faults.fail_nth(OpKind::Flush, 1, FaultError::Io);
    assert!(img.flush().await.is_err(), "the injected flush failure");
    // Only one flush failed: the storage would sync again. The image must not.
    let flushes = faults.count(OpKind::Flush);
    let r = img.flush().await;
    assert_eq!(errno(&r), Some(5), "flush after a failed flush: {r:?}");
    assert_eq!(
        faults.count(OpKind::Flush),
        flushes,
        "no fsync after the failure"
    );
    let r = img.write_at(0, IoBuf::copy_from(&[7; 512])).await;
    assert_eq!(errno(&r), Some(5), "write after a failed flush: {r:?}");
    let r = img
        .zero_range(0, 4096, ZeroFlags::default())
        .await
        .map(|_| ());
    assert_eq!(
        errno(&r),
        Some(5),
        "write-zeroes after a failed flush: {r:?}"
    );
    let r = img.discard_range(0, 4096).await.map(|_| ());
    assert_eq!(errno(&r), Some(5), "discard after a failed flush: {r:?}");
    // Reads still work, and see what was written.
    let data = img.read_at(0, IoBufMut::zeroed(8192)).await.unwrap();
    assert_eq!(&data[..], &pattern(1, 8192)[..]);
    let r = img.close().await;
    assert_eq!(
        errno(&r),
        Some(5),
        "close must not report durability: {r:?}"
    );
    // What was flushed before the failure is intact on the storage.
    let mut durable = vec![0u8; SIZE as usize];
    durable[..8192].copy_from_slice(&pattern(1, 8192));
    let mut touched = vec![false; SIZE as usize];
    touched[65536..65536 + 8192].fill(true);
    verify_on_good_storage(&mem, &durable, &touched)
        .await
        .unwrap();
}

#[tokio::test]
async fn failed_metadata_write_is_retried_by_the_next_flush() {
    let mem = fresh_image().await;
    let (img, faults) = open_faulty(&mem, &Qcow2Options::default()).await;
    let data = pattern(3, 3 * 4096);
    img.write_at(4096, IoBuf::copy_from(&data)).await.unwrap();
    // Every metadata write of this flush fails (ENOSPC); no fsync failed, so the image is not
    // failed, and the dirty tables must still be dirty for the next flush.
    faults.fail_from(OpKind::Write, 1, FaultError::NoSpace);
    let r = img.flush().await;
    assert_eq!(errno(&r), Some(28), "{r:?}");
    faults.disarm_all();
    img.flush().await.expect("flush after the space came back");
    img.close().await.unwrap();
    let mut durable = vec![0u8; SIZE as usize];
    durable[4096..4096 + data.len()].copy_from_slice(&data);
    verify_on_good_storage(&mem, &durable, &vec![false; SIZE as usize])
        .await
        .unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64, unmap: bool },
    Discard { off: u64, len: u64 },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    // Offsets and lengths in 512-byte sectors over the first 512 KiB: partial clusters, several
    // L2 slices with the small cache.
    let range = (0u64..1024, 1u64..48).prop_map(|(s, n)| (s * 512, n.min(1024 - s).max(1) * 512));
    prop_oneof![
        4 => (range.clone(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        1 => (range.clone(), any::<bool>()).prop_map(|((off, len), unmap)| Op::Zero { off, len, unmap }),
        1 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        2 => Just(Op::Flush),
    ]
}

fn kind() -> impl Strategy<Value = OpKind> {
    prop_oneof![
        Just(OpKind::Read),
        Just(OpKind::Write),
        Just(OpKind::Flush),
        Just(OpKind::SetLen),
        Just(OpKind::WriteZeroes),
        Just(OpKind::Discard),
    ]
}

fn fault_error() -> impl Strategy<Value = FaultError> {
    prop_oneof![Just(FaultError::Io), Just(FaultError::NoSpace)]
}

/// Runs `ops` with a fault armed; returns an error message if any rule above is broken.
async fn run_with_fault(
    ops: Vec<Op>,
    kind: OpKind,
    nth: u64,
    sticky: bool,
    error: FaultError,
) -> Result<(), String> {
    let mem = fresh_image().await;
    let (img, faults) = open_faulty(&mem, &small_cache()).await;
    if sticky {
        faults.fail_from(kind, nth, error);
    } else {
        faults.fail_nth(kind, nth, error);
    }
    let size = SIZE as usize;
    let mut model = vec![0u8; size];
    let mut durable = vec![0u8; size];
    // Bytes whose content after a crash or failure is not known: written since the last
    // successful flush, or touched by a failed request (until a later write covers them).
    let mut touched = vec![false; size];
    let mut failed_ranges = vec![false; size];
    for op in &ops {
        let failed_before = faults.injected(OpKind::Flush) > 0;
        let injected_before = faults.injected_total();
        let (r, what, range) = match op {
            Op::Write { off, len, seed } => {
                let data = pattern(*seed, *len as usize);
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                let r = img.write_at(*off, IoBuf::copy_from(&data)).await;
                model[a..b].copy_from_slice(&data);
                (r, "write", Some((a, b)))
            }
            Op::Zero { off, len, unmap } => {
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                let flags = ZeroFlags {
                    may_unmap: *unmap,
                    fast_only: false,
                };
                let r = img.zero_range(*off, *len, flags).await.map(|_| ());
                model[a..b].fill(0);
                (r, "write-zeroes", Some((a, b)))
            }
            Op::Discard { off, len } => {
                let cs = 1u64 << CLUSTER_BITS;
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                let r = img.discard_range(*off, *len).await.map(|_| ());
                let (ca, cb) = (off.next_multiple_of(cs), (off + len) / cs * cs);
                if ca < cb {
                    model[ca as usize..cb as usize].fill(0);
                }
                // Only whole clusters are discarded: the content elsewhere is left as it was
                // (and stays unknown if a failed request left it so).
                (
                    r,
                    "discard",
                    (ca < cb).then_some((ca as usize, cb as usize)),
                )
            }
            Op::Flush => {
                let r = img.flush().await;
                if r.is_ok() {
                    durable.copy_from_slice(&model);
                    touched.copy_from_slice(&failed_ranges);
                }
                (r, "flush", None)
            }
        };
        match (&r, range) {
            (Ok(()), Some((a, b))) => failed_ranges[a..b].fill(false),
            (Err(_), Some((a, b))) => failed_ranges[a..b].fill(true),
            _ => {}
        }
        if failed_before {
            // The image is failed: everything but reads returns EIO.
            match &r {
                Ok(()) => return Err(format!("{what} succeeded after a failed flush")),
                Err(e) if e.errno() != 5 => {
                    return Err(format!("{what} after a failed flush: {e}, not EIO"))
                }
                Err(_) => {}
            }
        }
        let injected = faults.injected_total() > injected_before;
        match &r {
            Err(e) if !injected && !failed_before => {
                return Err(format!("{what} failed without an injected fault: {e}"))
            }
            Ok(()) if injected && faults.injected(OpKind::Discard) == 0 => {
                return Err(format!(
                    "{what} succeeded although a fault was injected into it"
                ))
            }
            _ => {}
        }
    }
    // Close may fail (the fault may still be armed, or the image failed); it must not panic.
    let _ = img.close().await;
    verify_on_good_storage(&mem, &durable, &touched).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_workload_with_a_fault_stays_consistent(
        ops in prop::collection::vec(op(), 1..40),
        kind in kind(),
        nth in 1u64..40,
        sticky in any::<bool>(),
        error in fault_error(),
    ) {
        let r = runtime().block_on(run_with_fault(ops, kind, nth, sticky, error));
        prop_assert!(r.is_ok(), "{}", r.err().unwrap_or_default());
    }
}

/// Runs `ops` on storage whose `fail_at`-th flush fails as a failed writeback does on Linux (its
/// writes lost, except those `policy` keeps; the next fsync would succeed). Then power is lost
/// with everything written after the failure kept (the most the disk could hold). Whatever a
/// successful flush acknowledged must read back, and the image must be free of corruption.
async fn run_with_failed_writeback(
    ops: Vec<Op>,
    fail_at: u64,
    policy: CrashPolicy,
) -> Result<(), String> {
    let mem = fresh_image().await;
    let crash = Arc::new(CrashStorage::new(&mem));
    crash.fail_flush(fail_at, policy);
    let img = Qcow2::open(
        crash.clone(),
        "failing".into(),
        &small_cache(),
        false,
        CacheMode::Writeback,
    )
    .await
    .map_err(|e| format!("open: {e}"))?;
    let size = SIZE as usize;
    let mut model = vec![0u8; size];
    let mut durable = vec![0u8; size];
    let mut touched = vec![false; size];
    let mut failed = false;
    for op in &ops {
        let (r, what) = match op {
            Op::Write { off, len, seed } => {
                let data = pattern(*seed, *len as usize);
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                model[a..b].copy_from_slice(&data);
                (img.write_at(*off, IoBuf::copy_from(&data)).await, "write")
            }
            Op::Zero { off, len, unmap } => {
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                model[a..b].fill(0);
                let flags = ZeroFlags {
                    may_unmap: *unmap,
                    fast_only: false,
                };
                (
                    img.zero_range(*off, *len, flags).await.map(|_| ()),
                    "write-zeroes",
                )
            }
            Op::Discard { off, len } => {
                let (a, b) = (*off as usize, (*off + *len) as usize);
                touched[a..b].fill(true);
                let cs = 1u64 << CLUSTER_BITS;
                let (ca, cb) = (off.next_multiple_of(cs), (off + len) / cs * cs);
                if ca < cb {
                    model[ca as usize..cb as usize].fill(0);
                }
                (img.discard_range(*off, *len).await.map(|_| ()), "discard")
            }
            Op::Flush => {
                let r = img.flush().await;
                match &r {
                    Ok(()) if failed => {
                        return Err("a flush succeeded after a failed writeback".into())
                    }
                    Ok(()) => {
                        durable.copy_from_slice(&model);
                        touched.fill(false);
                    }
                    Err(_) => failed = true,
                }
                (r, "flush")
            }
        };
        if failed && r.is_ok() {
            return Err(format!("{what} succeeded after a failed writeback"));
        }
    }
    let _ = img.close().await;
    let after = crash.crash_now(CrashPolicy::KeepAll);
    verify_on_good_storage(&after, &durable, &touched).await
}

fn writeback_policy() -> impl Strategy<Value = CrashPolicy> {
    prop_oneof![
        Just(CrashPolicy::KeepNone),
        any::<u64>().prop_map(CrashPolicy::Random)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn failed_writeback_never_counts_as_durable(
        ops in prop::collection::vec(op(), 1..60),
        fail_at in 1u64..6,
        policy in writeback_policy(),
    ) {
        let r = runtime().block_on(run_with_failed_writeback(ops, fail_at, policy));
        prop_assert!(r.is_ok(), "{}", r.err().unwrap_or_default());
    }
}
