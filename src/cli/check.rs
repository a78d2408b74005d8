//! `qimg check`: consistency check with qemu-img's messages, summary, JSON and exit codes
//! (0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 format without checks).
//! `-r leaks|all` rebuilds the refcounts (which repairs leaks and refcount corruption).

use super::fail;
use super::info::pretty;
use super::opts::{open_options, open_with, ImageArgs};
use qimg::block::Format;
use qimg::qcow2::{CheckReport, Fix};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct Args {
    /// QEMU objects: secret,id=ID,data=TEXT|file=FILE[,format=raw|base64] (nothing uses a
    /// secret until encrypted images are supported); other object types are refused
    #[arg(long = "object", value_name = "OBJECT")]
    object: Vec<String>,
    #[arg(short = 'f')]
    format: Option<String>,
    /// The image name is an option list (driver=qcow2,file.filename=NAME,...)
    #[arg(long = "image-opts")]
    image_opts: bool,
    /// Output format: human or json
    #[arg(long = "output", default_value = "human")]
    output: String,
    /// Repair: leaks or all (rebuilds the refcount structure)
    #[arg(short = 'r', long = "repair")]
    repair: Option<String>,
    /// Quiet: no summary
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode
    #[arg(short = 'T')]
    cache: Option<String>,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    filename: String,
}

pub async fn run(a: Args) -> u8 {
    if let Err(e) = super::objects::define(&a.object) {
        return super::fail(e.to_string());
    }
    if a.output != "human" && a.output != "json" {
        return fail(format!(
            "--output expects 'human' or 'json' not '{}'",
            a.output
        ));
    }
    if let Some(r) = &a.repair {
        if r != "leaks" && r != "all" {
            return fail(format!("--repair (-r) expects 'leaks' or 'all' not '{r}'"));
        }
    }
    let args = ImageArgs {
        image_opts: a.image_opts,
        path: &a.filename,
        format: a.format.as_deref(),
        read_only: a.repair.is_none(),
        cache: a.cache.as_deref(),
        runtime_opts: &[],
        no_backing: true,
        batch: false,
        force_share: a.force_share,
        metadata_only: false,
        aio: None,
    };
    let opened = match open_options(&args) {
        Ok((path, mut opts)) => {
            // A dirty image is checked as the crash left it, not silently repaired at open.
            opts.qcow2.for_check = true;
            open_with(&path, &opts).await
        }
        Err(e) => Err(e),
    };
    let img = match opened {
        Ok(i) => i,
        Err(e) => return fail(format!("Could not open '{}': {e}", a.filename)),
    };
    let Some(q) = img.as_qcow2() else {
        let _ = img.close().await;
        let _ = Format::Raw;
        return fail("This image format does not support checks");
    };
    let fix = match a.repair.as_deref() {
        Some("all") => Fix::ALL,
        Some(_) => Fix::LEAKS,
        None => Fix::NONE,
    };
    let mut result = q.check_with(fix).await;
    let mut fixed = (0u64, 0u64);
    // Standard output comes at the end, after every message on standard error, as from
    // qemu-img writing to a pipe (fully buffered): scripts see the same order.
    let mut out = String::new();
    if let Ok(first) = &result {
        if first.leaks_fixed > 0 || first.corruptions_fixed > 0 {
            for m in &first.messages {
                eprintln!("{m}");
            }
            fixed = (first.leaks_fixed, first.corruptions_fixed);
            if a.output == "human" && !a.quiet {
                out += &format!(
                    "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                    fixed.0, fixed.1
                );
            }
            result = q.check().await;
        }
    }
    // Repaired (or found consistent) with -r: the image is clean now, as QEMU marks it.
    if let Ok(report) = &result {
        if fix != Fix::NONE && report.corruptions == 0 && report.check_errors == 0 {
            if let Err(e) = q.mark_clean().await {
                result = Err((report.clone(), e));
            } else if let Err(e) = q.mark_consistent().await {
                result = Err((report.clone(), e));
            }
        }
    }
    let code = match result {
        Err((report, e)) => {
            for m in &report.messages {
                eprintln!("{m}");
            }
            print!("{out}");
            fail(format!("Check failed: {}", super::io::errno_text(&e)))
        }
        Ok(report) => {
            for m in &report.messages {
                eprintln!("{m}");
            }
            print!("{out}");
            if !a.quiet {
                if a.output == "json" {
                    println!("{}", pretty(&report_json(&report, &a.filename, fixed)));
                } else {
                    print!("{}", report_human(&report));
                }
            }
            if report.check_errors > 0 {
                fail("Check failed")
            } else {
                report.exit_code()
            }
        }
    };
    let _ = img.close().await;
    code
}

fn report_human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s += "No errors were found on the image.\n";
    } else {
        if r.corruptions > 0 {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            );
        }
        if r.leaks > 0 {
            s += &format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            );
        }
        if r.check_errors > 0 {
            s += &format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            );
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let a = r.allocated_clusters as f64;
        s += &format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            a * 100.0 / r.total_clusters as f64,
            r.fragmented_clusters as f64 * 100.0 / a,
            r.compressed_clusters as f64 * 100.0 / a
        );
    }
    if r.image_end_offset != 0 {
        s += &format!("Image end offset: {}\n", r.image_end_offset);
    }
    s
}

fn report_json(r: &CheckReport, filename: &str, fixed: (u64, u64)) -> Value {
    let mut m = serde_json::Map::new();
    let opt = |m: &mut serde_json::Map<String, Value>, k: &str, v: u64| {
        if v != 0 {
            m.insert(k.into(), json!(v));
        }
    };
    opt(&mut m, "image-end-offset", r.image_end_offset);
    opt(&mut m, "compressed-clusters", r.compressed_clusters);
    opt(&mut m, "total-clusters", r.total_clusters);
    opt(&mut m, "corruptions", r.corruptions);
    opt(&mut m, "corruptions-fixed", fixed.1);
    m.insert("check-errors".into(), json!(r.check_errors));
    opt(&mut m, "leaks", r.leaks);
    opt(&mut m, "leaks-fixed", fixed.0);
    opt(&mut m, "allocated-clusters", r.allocated_clusters);
    m.insert("filename".into(), json!(filename));
    m.insert("format".into(), json!("qcow2"));
    opt(&mut m, "fragmented-clusters", r.fragmented_clusters);
    Value::Object(m)
}
