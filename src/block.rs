//! The format-independent view of an image: [`BlockDevice`], opening files with format probing,
//! and backing chains.
//!
//! The CLI and the NBD server only see `Arc<dyn BlockDevice>`; a qcow2 image sees its backing
//! file the same way (which may itself be qcow2 or raw).

use crate::buf::{IoBuf, IoBufMut};
use crate::error::{Error, IoContext, Result};
use crate::qcow2::{Preallocation, Qcow2, Qcow2Options};
use crate::raw::Raw;
use crate::storage::file::{FileOptions, FileStorage, LockRequest};
pub use crate::storage::lock::{Access, LockOptions, Locking};
use crate::storage::uring::UringStorage;
use crate::storage::{IoFuture, StorageRef};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest backing chain we open (a loop or a pathological chain fails with a clear error).
pub const MAX_BACKING_DEPTH: usize = 64;

/// Image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(Error::arg(format!("Unknown driver '{other}'"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Host cache modes, as qemu-img's `-t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CacheMode {
    #[default]
    Writeback,
    Writethrough,
    None,
    DirectSync,
    Unsafe,
}

impl CacheMode {
    pub fn parse(s: &str) -> Result<CacheMode> {
        Ok(match s {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "unsafe" => CacheMode::Unsafe,
            other => return Err(Error::arg(format!("Invalid cache option: {other}"))),
        })
    }

    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Every write is durable when it completes.
    pub fn writethrough(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }

    pub fn no_flush(self) -> bool {
        self == CacheMode::Unsafe
    }

    pub fn file_options(self, read_only: bool) -> FileOptions {
        FileOptions {
            read_only,
            direct: self.direct(),
            no_flush: self.no_flush(),
            writes_on_caller: false,
            lock: None,
        }
    }
}

/// Flags of a write-zeroes request.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroFlags {
    /// The range may be deallocated (qemu-io `write -z -u`, NBD without NO_HOLE).
    pub may_unmap: bool,
    /// Fail with `Unsupported` rather than write zero buffers (NBD FAST_ZERO).
    pub fast_only: bool,
}

/// What one layer says about a range of the virtual disk (the flags of qemu-img map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BlockStatus {
    pub len: u64,
    /// Data is stored in this layer.
    pub data: bool,
    /// The range reads as zeros.
    pub zero: bool,
    pub compressed: bool,
    /// Where the data lies in this layer's file.
    pub offset: Option<u64>,
    /// This layer defines the content (as opposed to falling through to a backing file).
    pub allocated: bool,
}

impl BlockStatus {
    /// Whether the status is decided by this layer (otherwise ask the backing file).
    pub fn is_final(&self) -> bool {
        self.data || self.zero
    }
}

/// What the whole backing chain says about an extent (qemu-img map's line, NBD's block status).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainStatus {
    pub offset: u64,
    pub len: u64,
    /// Index of the layer that decides the content (0 = the image itself); equal to the number
    /// of layers when no layer does (unallocated everywhere).
    pub depth: u64,
    /// Some layer defines the content.
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the file of the deciding layer.
    pub host_offset: Option<u64>,
    /// File name of the deciding layer.
    pub filename: String,
}

/// Walks the chain for the extent at `offset` (at most `max` bytes): the first layer that
/// decides it, as qemu-img map does.
pub async fn chain_status(
    img: &Arc<dyn BlockDevice>,
    offset: u64,
    max: u64,
) -> Result<ChainStatus> {
    let mut layer = img.clone();
    let mut depth = 0;
    let mut max = max;
    loop {
        let st = layer.block_status(offset, max).await?;
        max = st.len.max(1).min(max);
        if st.is_final() {
            return Ok(ChainStatus {
                offset,
                len: max,
                depth,
                present: st.allocated,
                zero: st.zero,
                data: st.data,
                compressed: st.compressed,
                host_offset: st.offset,
                filename: layer.data_filename().to_string(),
            });
        }
        match layer.backing() {
            Some(b) => {
                layer = b;
                depth += 1;
            }
            None => {
                return Ok(ChainStatus {
                    offset,
                    len: max,
                    depth,
                    present: false,
                    zero: false,
                    data: false,
                    compressed: false,
                    host_offset: None,
                    filename: layer.filename().to_string(),
                })
            }
        }
    }
}

/// How file I/O is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Aio {
    /// io_uring where the kernel allows it, otherwise the thread pool.
    #[default]
    Auto,
    /// Blocking syscalls on a worker thread pool.
    Threads,
    /// io_uring; an error where it is unavailable.
    IoUring,
}

impl Aio {
    pub fn parse(s: &str) -> Result<Aio> {
        match s {
            "auto" => Ok(Aio::Auto),
            "threads" => Ok(Aio::Threads),
            "io_uring" => Ok(Aio::IoUring),
            other => Err(Error::arg(format!(
                "Invalid aio option '{other}' (expected threads, io_uring or auto)"
            ))),
        }
    }

    /// Wraps a file in the chosen I/O engine.
    pub fn storage(self, file: FileStorage) -> Result<StorageRef> {
        match self {
            Aio::Threads => Ok(Arc::new(file)),
            Aio::Auto => Ok(match UringStorage::new(file) {
                Ok(u) => Arc::new(u),
                Err(f) => Arc::new(f),
            }),
            Aio::IoUring => match UringStorage::new(file) {
                Ok(u) => Ok(Arc::new(u)),
                Err(_) => Err(Error::unsupported(
                    "io_uring is not available here (kernel or sandbox refuses it); use --aio=threads",
                )),
            },
        }
    }
}

/// An open image of any format.
pub trait BlockDevice: Send + Sync {
    fn format(&self) -> Format;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// The file name the image was opened with.
    fn filename(&self) -> &str;
    /// The file holding the guest data, which block status host offsets refer to: the image
    /// file, or a qcow2 image's external data file.
    fn data_filename(&self) -> &str {
        self.filename()
    }
    fn read_only(&self) -> bool;
    /// Fills `buf` with the virtual disk content at `offset`.
    fn read(&self, offset: u64, buf: IoBufMut) -> IoFuture<'_, Result<IoBufMut>>;
    fn write(&self, offset: u64, data: IoBuf) -> IoFuture<'_, Result<()>>;
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> IoFuture<'_, Result<()>>;
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, Result<()>>;
    fn flush(&self) -> IoFuture<'_, Result<()>>;
    /// Flushes and releases the image (the handle must not be used afterwards).
    fn close(&self) -> IoFuture<'_, Result<()>>;
    /// The status of the extent starting at `offset` (at most `max` bytes) in this layer.
    fn block_status(&self, offset: u64, max: u64) -> IoFuture<'_, Result<BlockStatus>>;
    fn backing(&self) -> Option<Arc<dyn BlockDevice>>;
    /// Bytes the image takes on the host.
    fn allocated_bytes(&self) -> Option<u64>;
    /// QEMU's name of the protocol below the format (`file`, `nbd`).
    fn protocol(&self) -> &'static str {
        "file"
    }
    /// The image is a protocol opened without a format driver (QEMU's `driver=nbd`): `info`
    /// names the protocol as its format and shows no child node.
    fn protocol_node(&self) -> bool {
        false
    }
    /// Changes the virtual size (`qemu-img resize`, qemu-io's `truncate`), preallocating a
    /// grown area as `prealloc` says.
    fn resize(&self, new_size: u64, prealloc: Preallocation) -> IoFuture<'_, Result<()>>;
    fn as_qcow2(&self) -> Option<&Qcow2> {
        None
    }
    /// The image that is this image's file, when its file is an image (QEMU's
    /// `file.driver=raw|qcow2`), for `info`.
    fn file_image(&self) -> Option<Arc<dyn BlockDevice>> {
        None
    }
    /// The smallest request the image handles without read-modify-write of its own: 1 except
    /// for a probed raw image, whose first sector is checked whole (exported as the minimum
    /// block size, as QEMU does).
    fn request_alignment(&self) -> u32 {
        1
    }
    /// A step of the block layer above announced to the device (QEMU's `BLKDBG_EVENT` on a
    /// node: copy-on-read's `cor_write`): only a `blkdebug` node above a format acts on it.
    fn debug_event(
        &self,
        event: crate::storage::blkdebug::DebugEvent,
    ) -> crate::storage::blkdebug::Suspension {
        let _ = event;
        None
    }
    /// The breakpoint control of the first `blkdebug` node from the top (qemu-io's `break`
    /// and `resume` act on it, as QEMU's `bdrv_find_debug_node`).
    fn debug_handle(&self) -> Option<crate::storage::blkdebug::DebugHandle> {
        None
    }
}

/// Which other files an image may make qimg open. An image is untrusted input: its header can
/// name any path as its backing file, so a program that opens images from elsewhere (a guest's
/// upload, a backup) narrows this. The default is QEMU's behaviour: any local file, any depth,
/// formats probed when the image does not name them.
#[derive(Clone, Debug)]
pub struct FilePolicy {
    /// Backing files may be opened at all.
    pub backing: bool,
    /// A backing file may name a backing file of its own.
    pub nested_backing: bool,
    /// Backing files must lie (after resolving symlinks and `..`) inside one of these
    /// directories; `None` allows any.
    pub allowed_dirs: Option<Vec<PathBuf>>,
    /// Formats a backing file may have; `None` allows any.
    pub allowed_formats: Option<Vec<Format>>,
    /// A backing file whose format the image does not name may be probed.
    pub probe_backing: bool,
    /// An image may make us open the external data file its header names (a data file the
    /// user names is always allowed). `allowed_dirs` applies to it too.
    pub data_file: bool,
}

impl Default for FilePolicy {
    fn default() -> Self {
        FilePolicy {
            backing: true,
            nested_backing: true,
            allowed_dirs: None,
            allowed_formats: None,
            probe_backing: true,
            data_file: true,
        }
    }
}

impl FilePolicy {
    /// Checks a backing file named by `image` against the policy.
    fn check_backing(
        &self,
        image: &str,
        path: &Path,
        format: Option<Format>,
        depth: usize,
    ) -> Result<()> {
        let refuse = |why: String| {
            Err(Error::NotPermitted(format!(
                "'{image}' names backing file '{}', which the open policy does not allow: {why}",
                path.display()
            )))
        };
        if !self.backing {
            return refuse("backing files are not allowed".into());
        }
        if depth > 0 && !self.nested_backing {
            return refuse("a backing file may not have a backing file".into());
        }
        if !self.inside_allowed_dirs(path, "backing file")? {
            return refuse("it is outside the allowed directories".into());
        }
        match (format, &self.allowed_formats) {
            (None, _) if !self.probe_backing => {
                refuse("its format is not named and probing is not allowed".into())
            }
            (Some(f), Some(allowed)) if !allowed.contains(&f) => {
                refuse(format!("format {} is not allowed", f.name()))
            }
            _ => Ok(()),
        }
    }
}

impl FilePolicy {
    /// Whether `path` lies inside `allowed_dirs` (always, without that restriction).
    fn inside_allowed_dirs(&self, path: &Path, what: &str) -> Result<bool> {
        let Some(dirs) = &self.allowed_dirs else {
            return Ok(true);
        };
        let canon = std::fs::canonicalize(path)
            .map_err(|e| Error::io(format!("Could not open {what} '{}'", path.display()), e))?;
        Ok(dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| canon.starts_with(d))))
    }

    /// Checks an external data file named by `image` against the policy.
    fn check_data_file(&self, image: &str, path: &Path) -> Result<()> {
        let refuse = |why: &str| {
            Err(Error::NotPermitted(format!(
                "'{image}' names data file '{}', which the open policy does not allow: {why}",
                path.display()
            )))
        };
        if !self.data_file {
            return refuse("data files named by images are not allowed");
        }
        if !self.inside_allowed_dirs(path, "data file")? {
            return refuse("it is outside the allowed directories");
        }
        Ok(())
    }
}

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The image's format. `None` is an error unless `probe` is set: guessing lets whoever
    /// writes a raw image's first sector decide what it opens as next time.
    pub format: Option<Format>,
    /// Guess the format when `format` is `None` (qcow2 by its magic, otherwise raw). A probed
    /// raw image refuses writes that would make it probe as another format, as QEMU does.
    pub probe: bool,
    /// Which backing files the image may make us open.
    pub policy: FilePolicy,
    pub read_only: bool,
    pub cache: CacheMode,
    pub qcow2: Qcow2Options,
    /// Do not open the backing chain (qemu-img's `-U`-like metadata-only uses, `info`).
    pub no_backing: bool,
    /// How file I/O is issued.
    pub aio: Aio,
    /// Opened by a batch job (convert) rather than a server: buffered writes of any size are
    /// done on the calling thread (`FileOptions::writes_on_caller`).
    pub batch: bool,
    /// QEMU-compatible image locks (`locking=`, `-U`): see [`crate::storage::lock`]. The
    /// default locks wherever the file system allows it, as QEMU does.
    pub lock: LockOptions,
    /// Opened to read metadata only (`info`): holds no permission on the image, so it can be
    /// opened while a writer has it only with `-U`, as with qemu-img.
    pub metadata_only: bool,
    /// Opens the backing file this many layers down (1: the image's own backing file)
    /// read-write, for `commit`, which writes into it. The layers between stay read-only.
    pub writable_backing_depth: Option<usize>,
    /// The format of the image's own backing file, instead of what the image names
    /// (QEMU's `backing.driver=` runtime option).
    pub backing_format: Option<Format>,
    /// QEMU's block-layer `discard=` option for the image (not its backing files): see
    /// [`crate::block_options`]. `None`: discards reach the image.
    pub discard: Option<crate::block_options::Discard>,
    /// QEMU's block-layer `detect-zeroes=` option. `None`: off.
    pub detect_zeroes: Option<crate::block_options::DetectZeroes>,
    /// The image is an export of an NBD server, not a file (`nbd://` names, `driver=nbd`): the
    /// path is only its name. Never set from a name found inside an image.
    pub nbd: Option<crate::nbd::remote::Target>,
    /// The external data file of the image (QEMU's `data-file` runtime option), instead of
    /// the one its header names. Not for backing files.
    pub data_file: Option<DataFileSpec>,
    /// The image is QEMU's `null-co` device (discards writes, reads zeros), not a file: the
    /// path is only its name. Never set from a name found inside an image.
    pub null: Option<NullDevice>,
    /// A `blkdebug` node between the image's format and its file (QEMU's
    /// `blkdebug:CONFIG:NAME`, `file.driver=blkdebug`): see [`crate::storage::blkdebug`]. The
    /// image is then named as QEMU names it, `blkdebug:CONFIG:NAME`. For a backing file, only
    /// from a `json:` name ([`BackingNode`]).
    pub blkdebug: Option<crate::storage::blkdebug::Config>,
    /// A `blkdebug` node above the image (QEMU's `driver=blkdebug,image.driver=...`): guest
    /// requests meet its limits and rules first.
    pub blkdebug_above: Option<crate::storage::blkdebug::Config>,
    /// QEMU's `copy-on-read` filter over the image (see [`crate::copy_on_read`]).
    pub copy_on_read: bool,
    /// The image's file is itself an image (QEMU's `file.driver=qcow2`): opened first, its
    /// guest disk holds this image (see [`crate::storage::device`]).
    pub file_image: Option<Box<NestedImage>>,
    /// The image is a protocol node opened without a format (QEMU's `driver=file`,
    /// `host_device`, `host_cdrom`): read and written as raw, named by this driver, and the
    /// file's type checked as that driver checks it.
    pub protocol_driver: Option<&'static str>,
    /// Reads backing file names that are not file names (QEMU's `json:{...}`), for this image
    /// and its whole chain. `None`: such names are refused.
    pub backing_resolver: Option<BackingResolver>,
    /// QEMU's raw `offset=`/`size=`: the raw image is this part of its file (see
    /// [`crate::storage::window`]). Refused for other formats.
    pub raw_window: Option<RawWindow>,
    /// The image's file is a quorum of files (QEMU's `file.driver=quorum`, see
    /// [`crate::storage::quorum`]): the path is only its name. Never set from a name found
    /// inside an image.
    pub quorum: Option<crate::storage::quorum::QuorumSpec>,
}

/// A raw image stored at `offset` inside its file, `size` bytes long (else to the file's end).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawWindow {
    pub offset: u64,
    pub size: Option<u64>,
    /// The options as the user wrote them (`offset=1M`), for the image's name, which QEMU
    /// builds from them.
    pub offset_text: Option<String>,
    pub size_text: Option<String>,
}

/// What a backing file name that is not a plain file name stands for (QEMU's `json:{...}`
/// names, which QEMU writes into images when a chain was built from options): a local file,
/// its format, and the `blkdebug` or windowed raw node between them, if any.
#[derive(Clone, Debug)]
pub struct BackingNode {
    pub path: PathBuf,
    pub format: Option<Format>,
    pub blkdebug: Option<crate::storage::blkdebug::Config>,
    /// `"backing": null`: the backing image is opened without its own backing file.
    pub no_backing: bool,
    /// A raw node with `offset`/`size` between the format and the file (QEMU's
    /// `"file": {"driver": "raw", "size": ...}`): the image lies in that part of the file.
    pub raw_window: Option<RawWindow>,
}

/// Turns a backing file name into a [`BackingNode`]. It is given by the application, which
/// knows QEMU's option syntax (the library only knows file names), and decides which drivers a
/// name read from an image may ask for; a network connection must never be one of them.
#[derive(Clone)]
pub struct BackingResolver(pub Arc<ResolveFn>);

/// The function inside a [`BackingResolver`].
pub type ResolveFn = dyn Fn(&str) -> Result<BackingNode> + Send + Sync;

impl std::fmt::Debug for BackingResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackingResolver")
    }
}

/// Where the backing file `name` of the image at `image` is, and how it is to be opened when
/// the name is not a file name.
pub fn resolve_backing_node(
    image: &Path,
    name: &str,
    resolver: Option<&BackingResolver>,
) -> Result<(PathBuf, Option<BackingNode>)> {
    match resolver {
        Some(r) if name.starts_with("json:") => {
            let node = (r.0)(name)?;
            Ok((node.path.clone(), Some(node)))
        }
        _ => Ok((resolve_backing(image, name)?, None)),
    }
}

/// An image that is another image's file: where it is and how to open it.
#[derive(Clone, Debug)]
pub struct NestedImage {
    pub path: String,
    pub opts: OpenOptions,
}

/// QEMU's `null-co` driver: a device of `size` bytes with nothing behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NullDevice {
    pub size: u64,
    /// Block status says it reads zeros (`read-zeroes`).
    pub read_zeroes: bool,
}

/// An external data file given by the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataFileSpec {
    Path(PathBuf),
    Null(NullDevice),
    /// A file behind a `blkdebug` node (QEMU's `data-file.driver=raw`,
    /// `data-file.file.driver=blkdebug`): failure tests of the data file's I/O.
    Blkdebug(PathBuf, crate::storage::blkdebug::Config),
}

impl OpenOptions {
    /// What this open holds and shares (QEMU's permissions for the same use).
    fn access(&self) -> Result<Access> {
        let access = if self.metadata_only {
            Access::METADATA
        } else if self.read_only {
            Access::READ
        } else {
            Access::READ_WRITE
        };
        if !self.lock.force_share {
            return Ok(access);
        }
        if !self.read_only {
            return Err(Error::arg(
                "force-share=on can only be used with read-only images",
            ));
        }
        Ok(access.force_shared())
    }
}

/// Probes the format of a file from its first bytes.
pub fn probe(header: &[u8]) -> Format {
    if header.len() >= 4 && header[0..4] == crate::format::header::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    }
}

/// Opens an image file and its backing chain.
pub async fn open_image(path: &Path, opts: &OpenOptions) -> Result<Arc<dyn BlockDevice>> {
    // Requests run tasks on the caller's tokio runtime (background writeback, the free
    // scheduler): another executor gets an error here rather than a panic later.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(Error::arg(
            "qimg images must be opened from within a tokio runtime (multi-thread or current-thread; \
             timers are not needed)",
        ));
    }
    let mut seen = Vec::new();
    let mut img = match &opts.file_image {
        None => open_layer(path, opts, 0, &mut seen).await?,
        Some(nested) => open_nested(path, opts, nested).await?,
    };
    if let Some(cfg) = &opts.blkdebug_above {
        img = crate::storage::blkdebug::BlkdebugDevice::wrap(img, cfg.clone());
    }
    if opts.copy_on_read {
        if opts.read_only {
            let _ = img.close().await;
            return Err(Error::arg("Block node is read-only"));
        }
        img = crate::copy_on_read::CopyOnRead::wrap(img)?;
    }
    if opts.discard.is_none() && opts.detect_zeroes.is_none() {
        return Ok(img);
    }
    use crate::block_options::{DetectZeroes, Discard, WithOptions};
    let wrapped = WithOptions::wrap(
        img.clone(),
        opts.discard.unwrap_or(Discard::Unmap),
        opts.detect_zeroes.unwrap_or(DetectZeroes::Off),
    );
    match wrapped {
        Ok(w) => Ok(w),
        Err(e) => {
            let _ = img.close().await;
            Err(e)
        }
    }
}

/// Opens the image whose file is the image `nested`: the inner one first, then this one on its
/// disk; a failure closes the inner one again.
async fn open_nested(
    path: &Path,
    opts: &OpenOptions,
    nested: &NestedImage,
) -> Result<Arc<dyn BlockDevice>> {
    let inner = Box::pin(open_image(Path::new(&nested.path), &nested.opts)).await?;
    open_over(inner, path, opts, 0, &mut Vec::new()).await
}

/// Opens a layer whose file is read through a windowed raw node (a backing file named
/// `json:{"driver": "qcow2", "file": {"driver": "raw", "size": ...}}`): the raw node first,
/// with the layer's file options, then the layer on it.
async fn open_windowed(
    path: &Path,
    opts: &OpenOptions,
    window: RawWindow,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    let raw = OpenOptions {
        format: Some(Format::Raw),
        probe: false,
        raw_window: Some(window),
        blkdebug: opts.blkdebug.clone(),
        read_only: opts.read_only,
        cache: opts.cache,
        lock: opts.lock,
        aio: opts.aio,
        batch: opts.batch,
        policy: opts.policy.clone(),
        ..Default::default()
    };
    let inner = open_layer(path, &raw, depth, seen).await?;
    let outer = OpenOptions {
        blkdebug: None,
        ..opts.clone()
    };
    open_over(inner, path, &outer, depth, seen).await
}

/// Opens the format of `opts` on the guest disk of `inner` (an image that is this one's
/// file); a failure closes `inner` again.
async fn open_over(
    inner: Arc<dyn BlockDevice>,
    path: &Path,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    let storage: StorageRef = Arc::new(crate::storage::device::DeviceStorage(inner.clone()));
    let mut name = inner.filename().to_string();
    // An inner image named by its options makes the outer one named by them too, as QEMU
    // names it ("driver" sorts before "file" in QEMU's dictionaries).
    if let (Some(inner_json), Some(f)) = (name.strip_prefix("json:"), opts.format) {
        name = format!(r#"json:{{"driver": "{}", "file": {inner_json}}}"#, f.name());
    }
    match open_format(storage, path, name, opts, depth, seen).await {
        Ok(outer) => Ok(Arc::new(crate::storage::device::Nested { outer, inner })),
        Err(e) => {
            let _ = inner.close().await;
            Err(e)
        }
    }
}

fn open_layer<'a>(
    path: &'a Path,
    opts: &'a OpenOptions,
    depth: usize,
    seen: &'a mut Vec<PathBuf>,
) -> futures_util::future::BoxFuture<'a, Result<Arc<dyn BlockDevice>>> {
    Box::pin(async move {
        if depth > MAX_BACKING_DEPTH {
            return Err(Error::invalid(format!(
                "Backing chain is deeper than {MAX_BACKING_DEPTH} images"
            )));
        }
        let name = path.display().to_string();
        if let (0, Some(null)) = (depth, opts.null) {
            let storage: StorageRef = Arc::new(crate::storage::null::NullStorage::new(
                null.size,
                null.read_zeroes,
            ));
            return open_format(storage, path, name, opts, depth, seen).await;
        }
        if let (0, Some(target)) = (depth, &opts.nbd) {
            // The connection's errors say what failed ("Failed to connect to ...", the
            // server's refusal), as QEMU's NBD driver reports them.
            let storage = crate::nbd::remote::NbdStorage::connect(target)
                .await
                .map_err(|e| Error::io(String::new(), e))?;
            let storage: StorageRef = Arc::new(storage);
            return open_format(storage, path, name, opts, depth, seen).await;
        }
        if let (0, Some(spec)) = (depth, &opts.quorum) {
            spec.validate()?;
            let mut children: Vec<StorageRef> = Vec::new();
            for child in &spec.children {
                children.push(opts.aio.storage(open_file(child, opts)?)?);
            }
            let names = spec
                .children
                .iter()
                .map(|c| c.display().to_string())
                .collect();
            let storage: StorageRef = Arc::new(crate::storage::quorum::Quorum::new(
                children,
                names,
                spec.threshold,
                spec.read_pattern,
            ));
            let name = match opts.format {
                Some(f) => format!(
                    r#"json:{{"driver": "{}", "file": {}}}"#,
                    f.name(),
                    &spec.qemu_name()["json:".len()..]
                ),
                None => spec.qemu_name(),
            };
            return open_format(storage, path, name, opts, depth, seen).await;
        }
        let storage = open_file(path, opts)?;
        if let Ok(canon) = std::fs::canonicalize(path) {
            if seen.contains(&canon) {
                return Err(Error::BackingLoop(name));
            }
            seen.push(canon);
        }
        let mut storage: StorageRef = opts.aio.storage(storage)?;
        let mut name = name;
        if let Some(cfg) = &opts.blkdebug {
            name = cfg.image_name(opts.format.map(Format::name), &name);
            storage = Arc::new(crate::storage::blkdebug::Blkdebug::new(
                storage,
                cfg.clone(),
            ));
        }
        open_format(storage, path, name, opts, depth, seen).await
    })
}

/// Opens the format driver of a layer on its storage (and, for qcow2, its backing chain).
async fn open_format(
    storage: StorageRef,
    path: &Path,
    name: String,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut Vec<PathBuf>,
) -> Result<Arc<dyn BlockDevice>> {
    {
        let format = match opts.format {
            Some(f) => f,
            None if !opts.probe => {
                return Err(Error::arg(format!(
                    "Image format was not specified for '{name}' (give the format, or allow \
                     probing with OpenOptions::probe)"
                )));
            }
            None => {
                let head = crate::storage::read_vec(&*storage, 0, 512)
                    .await
                    .context(|| format!("Could not read '{name}'"))?;
                probe(&head)
            }
        };
        match format {
            Format::Raw => {
                let (storage, name): (StorageRef, String) = match &opts.raw_window {
                    Some(w) => {
                        let window =
                            crate::storage::window::Window::new(storage, w.offset, w.size).await?;
                        // QEMU names such an image by its options, unless something else
                        // (a blkdebug node, a device) already gave it a name of its own.
                        let plain = opts.blkdebug.is_none() && name == path.display().to_string();
                        let name = if plain {
                            crate::storage::window::qemu_name(w, &name)
                        } else {
                            name
                        };
                        (Arc::new(window), name)
                    }
                    None => (storage, name),
                };
                Ok(Arc::new(Raw::open(storage, name, opts).await?) as Arc<dyn BlockDevice>)
            }
            Format::Qcow2 => {
                let mut qopts = opts.qcow2.clone();
                if opts.metadata_only {
                    // Like QEMU's metadata-only opens (BDRV_O_NO_IO): the data file is not
                    // even opened.
                    qopts.without_data_file = true;
                } else {
                    qopts.data_file = open_data_file(&*storage, &name, opts, depth, seen).await?;
                }
                let img =
                    Qcow2::open(storage, name.clone(), &qopts, opts.read_only, opts.cache).await?;
                if let Some(w) = &opts.raw_window {
                    let _ = img.close().await;
                    let option = if w.size.is_some() { "size" } else { "offset" };
                    return Err(Error::arg(format!(
                        "Block format 'qcow2' does not support the option '{option}'"
                    )));
                }
                // A failure past this point closes the image before it is reported: a handle
                // must not be dropped open (its locks and background work end with `close`).
                let attached = async {
                    let (Some(bname), false) = (img.backing_filename(), opts.no_backing) else {
                        return Ok(());
                    };
                    // A quorum has no directory a relative name could be relative to.
                    if depth == 0
                        && opts.quorum.is_some()
                        && !bname.starts_with("json:")
                        && !Path::new(&bname).is_absolute()
                    {
                        return Err(Error::arg(
                            "Cannot generate a base directory for quorum nodes",
                        ));
                    }
                    let (bpath, node) =
                        resolve_backing_node(path, &bname, opts.backing_resolver.as_ref())?;
                    let bformat = match (opts.backing_format, img.backing_format()) {
                        (Some(f), _) => Some(f),
                        // The driver a `json:` name gives.
                        (None, _) if node.as_ref().is_some_and(|n| n.format.is_some()) => {
                            node.as_ref().and_then(|n| n.format)
                        }
                        (None, Some(f)) => Some(Format::parse(&f).map_err(|_| {
                            Error::unsupported(format!(
                                "Could not open backing file: Unknown driver '{f}'"
                            ))
                        })?),
                        (None, None) => None,
                    };
                    opts.policy.check_backing(&name, &bpath, bformat, depth)?;
                    let window = node.as_ref().and_then(|n| n.raw_window.clone());
                    let writable = opts.writable_backing_depth == Some(depth + 1);
                    let bopts = OpenOptions {
                        format: bformat,
                        probe: true,
                        policy: opts.policy.clone(),
                        read_only: !writable,
                        cache: opts.cache,
                        qcow2: Qcow2Options::default(),
                        no_backing: node.as_ref().is_some_and(|n| n.no_backing),
                        aio: opts.aio,
                        batch: opts.batch,
                        lock: opts.lock,
                        metadata_only: opts.metadata_only,
                        writable_backing_depth: opts.writable_backing_depth,
                        backing_format: None,
                        // Block-layer options belong to the top image only.
                        discard: None,
                        detect_zeroes: None,
                        // A name inside an image never makes us connect anywhere.
                        nbd: None,
                        data_file: None,
                        null: None,
                        // Only a `json:` name puts a node between format and file.
                        blkdebug: node.and_then(|n| n.blkdebug),
                        blkdebug_above: None,
                        copy_on_read: false,
                        file_image: None,
                        protocol_driver: None,
                        backing_resolver: opts.backing_resolver.clone(),
                        raw_window: None,
                        quorum: None,
                    };
                    let backing = match window {
                        None => open_layer(&bpath, &bopts, depth + 1, seen).await,
                        Some(w) => {
                            Box::pin(open_windowed(&bpath, &bopts, w, depth + 1, seen)).await
                        }
                    };
                    let backing = backing.map_err(|e| match e {
                        Error::Io { context, source } => Error::Io {
                            context: format!("Could not open backing file: {context}"),
                            source,
                        },
                        other => other,
                    })?;
                    img.set_backing(backing);
                    Ok(())
                }
                .await;
                if let Err(e) = attached {
                    if let Err(c) = img.close().await {
                        tracing::warn!("{name}: closing after a failed open: {c}");
                    }
                    return Err(e);
                }
                let img = Arc::new(img);
                img.start_background(opts.qcow2.cache_clean_interval);
                Ok(img as Arc<dyn BlockDevice>)
            }
        }
    }
}

/// Opens a file of an image (the image itself, or its data file) with the image's cache mode
/// and locks; a lock conflict says only QEMU's words.
fn open_file(path: &Path, opts: &OpenOptions) -> Result<FileStorage> {
    let file_opts = FileOptions {
        writes_on_caller: opts.batch,
        lock: Some(LockRequest {
            access: opts.access()?,
            locking: opts.lock.locking,
        }),
        ..opts.cache.file_options(opts.read_only)
    };
    let file = FileStorage::open(path, file_opts).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            Error::Locked(e.to_string())
        } else {
            Error::io(format!("Could not open '{}'", path.display()), e)
        }
    })?;
    check_file_type(path, opts.protocol_driver)?;
    Ok(file)
}

/// QEMU's protocol drivers accept only their kind of file: `file` a regular file,
/// `host_device` and `host_cdrom` a character or block device. Without a driver named, a device
/// is opened as `host_device` (QEMU picks it for device paths) and anything else as `file`, so a
/// directory, a FIFO or a socket is refused, as QEMU refuses it.
fn check_file_type(path: &Path, driver: Option<&str>) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?
        .file_type();
    let device = t.is_char_device() || t.is_block_device();
    let driver = driver.unwrap_or(if device { "host_device" } else { "file" });
    let ok = match driver {
        "file" => t.is_file(),
        _ => device,
    };
    if ok {
        return Ok(());
    }
    let what = if driver == "file" {
        "a regular file"
    } else {
        "either a character or block device"
    };
    Err(Error::InvalidImage(format!(
        "'{driver}' driver requires '{}' to be {what}",
        path.display()
    )))
}

/// Opens the external data file of the qcow2 image on `storage`, if it has one: the one the
/// user names (top image only), or the one the image names, as the policy allows. See
/// `qcow2::data_file` for why a name from an image is treated as it is.
async fn open_data_file(
    storage: &dyn crate::storage::Storage,
    name: &str,
    opts: &OpenOptions,
    depth: usize,
    seen: &[PathBuf],
) -> Result<Option<crate::qcow2::data_file::DataFile>> {
    let explicit = opts.data_file.as_ref().filter(|_| depth == 0);
    let path = match explicit {
        Some(DataFileSpec::Null(null)) => {
            return Ok(Some(crate::qcow2::data_file::DataFile {
                storage: Arc::new(crate::storage::null::NullStorage::new(
                    null.size,
                    null.read_zeroes,
                )),
                name: "null-co://".into(),
            }));
        }
        Some(DataFileSpec::Path(p)) => p.clone(),
        Some(DataFileSpec::Blkdebug(p, _)) => p.clone(),
        None => {
            let Some(h) = crate::qcow2::data_file::header_if_data_file(storage).await else {
                return Ok(None);
            };
            // Without a name, the open fails with QEMU's message.
            let Some(file) = h.data_file_name() else {
                return Ok(None);
            };
            // A plain path, relative to the working directory (QEMU's resolution).
            let path = PathBuf::from(file);
            opts.policy.check_data_file(name, &path)?;
            path
        }
    };
    if let Ok(canon) = std::fs::canonicalize(&path) {
        if seen.contains(&canon) {
            return Err(Error::invalid(format!(
                "The data file '{}' of '{name}' is the image itself or one of its backing files",
                path.display()
            )));
        }
    }
    let file = open_file(&path, opts)?;
    let mut storage = opts.aio.storage(file)?;
    let mut name = path.display().to_string();
    if let Some(DataFileSpec::Blkdebug(_, cfg)) = explicit {
        name = cfg.image_name(Some("raw"), &name);
        storage = Arc::new(crate::storage::blkdebug::Blkdebug::new(
            storage,
            cfg.clone(),
        ));
    }
    Ok(Some(crate::qcow2::data_file::DataFile { storage, name }))
}

/// Resolves a backing file name the way QEMU does: relative to the directory of the image that
/// names it. Protocol names (`nbd:`, `json:`, ...) are refused: a name read from an untrusted
/// image must never make us open something other than a plain local file.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:")
        || name
            .split_once(':')
            .is_some_and(|(proto, _)| !proto.is_empty() && !proto.contains('/') && proto.len() < 16)
            && !Path::new(name).exists()
            && !image.parent().is_some_and(|d| d.join(name).exists())
    {
        return Err(Error::unsupported(format!(
            "Backing file '{name}' is not a local file name; protocols are not supported"
        )));
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(image
        .parent()
        .map(|d| d.join(p))
        .unwrap_or_else(|| p.to_path_buf()))
}

/// Checks that `[offset, offset+len)` lies inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_relative_to_the_image() {
        let img = Path::new("/images/dir/top.qcow2");
        assert_eq!(
            resolve_backing(img, "base.raw").unwrap(),
            Path::new("/images/dir/base.raw")
        );
        assert_eq!(
            resolve_backing(img, "../b/base.qcow2").unwrap(),
            Path::new("/images/dir/../b/base.qcow2")
        );
        assert_eq!(resolve_backing(img, "/abs/x").unwrap(), Path::new("/abs/x"));
        assert!(resolve_backing(img, "nbd://127.0.0.1:10809/x").is_err());
        assert!(resolve_backing(img, "json:{\"driver\":\"nbd\"}").is_err());
    }

    #[test]
    fn probing() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), Format::Qcow2);
        assert_eq!(probe(b"QFI"), Format::Raw);
        assert_eq!(probe(&[0u8; 512]), Format::Raw);
    }
}
