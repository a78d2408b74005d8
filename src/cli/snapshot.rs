//! `qimg snapshot`: list, create, apply and delete internal snapshots, as `qemu-img snapshot`
//! does (same options, same table, same messages). The work is `qimg::qcow2::snapshot`'s.

use super::opts::{open, ImageArgs};
use super::{fail, prog};
use qimg::qcow2::snapshot::SnapshotInfo;

#[derive(clap::Args)]
pub struct Args {
    /// Format of the image
    #[arg(short = 'f')]
    format: Option<String>,
    /// List the snapshots (the default)
    #[arg(short = 'l')]
    list: bool,
    /// Revert the disk to snapshot SNAPSHOT (an ID or a name)
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Create a snapshot named SNAPSHOT
    #[arg(short = 'c', value_name = "SNAPSHOT")]
    create: Option<String>,
    /// Delete the snapshot named SNAPSHOT
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Quiet (as with qemu-img, nothing but errors and the list is ever printed)
    #[arg(short = 'q')]
    quiet: bool,
    /// Open the image shared with writers (listing only)
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object")]
    object: Vec<String>,
    /// Treat the file name as an option string: not supported yet
    #[arg(long = "image-opts")]
    image_opts: bool,
    filenames: Vec<String>,
}

enum Action {
    List,
    Apply(String),
    Create(String),
    Delete(String),
}

/// The C library's text for an error number, as qemu-img prints snapshot errors.
fn errno_text(e: &qimg::Error) -> String {
    qimg::error::strerror(&std::io::Error::from_raw_os_error(e.errno()))
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return fail(e.to_string());
    }
    let actions = [
        a.list,
        a.apply.is_some(),
        a.create.is_some(),
        a.delete.is_some(),
    ];
    if actions.iter().filter(|&&x| x).count() > 1 {
        eprintln!("{}: Cannot mix '-l', '-a', '-c', '-d'", prog());
        eprintln!("Try '{} snapshot --help' for more info", prog());
        return 1;
    }
    let action = if let Some(n) = a.apply {
        Action::Apply(n)
    } else if let Some(n) = a.create {
        Action::Create(n)
    } else if let Some(n) = a.delete {
        Action::Delete(n)
    } else {
        Action::List
    };
    let [filename] = a.filenames.as_slice() else {
        eprintln!("{}: Expecting one image file name", prog());
        eprintln!("Try '{} snapshot --help' for more info", prog());
        return 1;
    };
    let img = match open(&ImageArgs {
        image_opts: a.image_opts,
        path: filename,
        format: a.format.as_deref(),
        read_only: matches!(action, Action::List),
        cache: None,
        runtime_opts: &[],
        no_backing: false,
        batch: false,
        force_share: a.force_share,
        metadata_only: false,
        aio: None,
    })
    .await
    {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{filename}': {e}")),
    };
    let q = img.as_qcow2();
    let code = match &action {
        Action::List => {
            // QEMU lists none on an image with a data file (it cannot have any).
            if let Some(q) = q.filter(|q| !q.has_data_file()) {
                let snaps = q.snapshots();
                if !snaps.is_empty() {
                    print!("Snapshot list:\n{}", super::info::snapshot_table(&snaps));
                }
            }
            0
        }
        Action::Create(name) => {
            let r = match q {
                Some(q) => q
                    .snapshot_create(&SnapshotInfo::now(name))
                    .await
                    .map(|_| ()),
                None => Err(qimg::Error::unsupported("Operation not supported")),
            };
            match r {
                Ok(()) => 0,
                Err(e) => {
                    tracing::info!("{e}");
                    fail(format!(
                        "Could not create snapshot '{name}': {}",
                        errno_text(&e)
                    ))
                }
            }
        }
        // QEMU refuses it before the driver sees it, and says so without an errno.
        Action::Apply(name) if q.is_some_and(|q| q.has_bitmaps()) => fail(format!(
            "Could not apply snapshot '{name}': Device has active dirty bitmaps"
        )),
        Action::Apply(name) => {
            let r = match q {
                Some(q) => q.snapshot_apply(name).await,
                None => Err(qimg::Error::unsupported("Operation not supported")),
            };
            match r {
                Ok(()) => 0,
                Err(e) => {
                    // A snapshot table entry QEMU validates itself is reported on its own
                    // line first; everything else by errno alone.
                    if e.to_string().starts_with("Snapshot L1 table") {
                        eprintln!("{}: {e}", super::prog());
                    } else {
                        tracing::info!("{e}");
                    }
                    fail(format!(
                        "Could not apply snapshot '{name}': Failed to load snapshot: {}",
                        errno_text(&e)
                    ))
                }
            }
        }
        Action::Delete(name) => {
            // qemu-img looks the snapshot up by name only, then deletes it by ID.
            let found = q
                .filter(|q| !q.has_data_file())
                .and_then(|q| q.snapshots().iter().find(|s| &s.name == name).cloned());
            match (q, found) {
                (Some(q), Some(sn)) => match q.snapshot_delete(&sn.id).await {
                    Ok(()) => 0,
                    Err(e) => fail(format!("Could not delete snapshot '{name}': {e}")),
                },
                _ => fail(format!(
                    "Could not delete snapshot '{name}': snapshot not found"
                )),
            }
        }
    };
    if let Err(e) = img.close().await {
        return fail(e);
    }
    // `-q` changes nothing: qemu-img snapshot prints nothing else either.
    let _ = a.quiet;
    code
}
