//! Image names as QEMU's tools take them, besides plain file names:
//! - `file:NAME`: the file protocol spelled out (a name with a colon in it, say);
//! - `json:{...}`: the image's options as a JSON object (QEMU's parser also takes
//!   single-quoted strings), nested (`"file": {"filename": ...}`) or dotted (`"file.filename"`);
//! - `--image-opts`: the name is an option list, `driver=qcow2,file.filename=NAME,...`.
//!
//! Each comes down to what qimg can open: a file, an optional format, runtime options of the
//! format driver (the same keys as `-o` lists take) and of the file (`locking`), and whether to
//! open the backing file. QEMU's `blkdebug` driver is taken below the format
//! (`blkdebug:CONFIG:NAME`, `file.driver=blkdebug`) and above it (`driver=blkdebug,image.driver=
//! qcow2`): its options are kept for [`qimg::storage::blkdebug::Config`]. Anything else (other
//! block drivers, nested backing options) is refused with a message naming it, never dropped.

use super::opts::parse_kv_list;
use qimg::block::{DataFileSpec, NullDevice};
use qimg::{Error, Result};

/// What an image name asks to open.
#[derive(Debug, Default, PartialEq)]
pub struct ImageSpec {
    /// The file to open.
    pub path: String,
    /// `driver=`: the format, if given.
    pub format: Option<String>,
    /// Runtime options (`key=value`, `,` escaped as `,,`), as for `-o` lists.
    pub runtime: Vec<String>,
    /// `backing: null`: the backing file is not opened.
    pub no_backing: bool,
    /// `read-only=on`.
    pub read_only: bool,
    /// An NBD export (`nbd://` and `nbd+unix://` names, QEMU's legacy `nbd:` names,
    /// `driver=nbd`): `path` is then only its name.
    pub nbd: Option<qimg::nbd::remote::Target>,
    /// `data-file.filename=` (or a `null-co` data file): the qcow2 image's external data file.
    pub data_file: Option<qimg::block::DataFileSpec>,
    /// QEMU's `null-co` device (`driver=null-co`, `null-co://`): `path` is then only its name.
    pub null: Option<qimg::block::NullDevice>,
    /// A `blkdebug` node between the format and the file: its options (without `file.`).
    pub blkdebug: Option<Vec<(String, String)>>,
    /// A `blkdebug` node above the format (`driver=blkdebug,image.driver=...`): its options.
    pub blkdebug_above: Option<Vec<(String, String)>>,
    /// QEMU's `copy-on-read` filter on top (`driver=copy-on-read,file.driver=...`).
    pub copy_on_read: bool,
    /// The file is itself an image (`file.driver=qcow2|raw`): its name; `path` is then its
    /// path too.
    pub inner: Option<Box<ImageSpec>>,
    /// `driver=file`, `host_device` or `host_cdrom`: the protocol node itself, no format.
    pub protocol_driver: Option<&'static str>,
    /// `file.driver=quorum`: the format's file is a quorum of files; `path` is then only its
    /// name.
    pub quorum: Option<qimg::storage::quorum::QuorumSpec>,
}

/// QEMU's rule for node names (`node-name=`): a letter, then letters, digits, `-`, `.`, `_`,
/// at most 31 characters. qimg accepts them (scripts name their nodes) but has no node graph
/// that refers to them; `reopen` refuses to change them, as QEMU does.
pub fn check_node_name(name: &str) -> Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !ok {
        return Err(Error::arg(format!("Invalid node-name: '{name}'")));
    }
    if name.len() > 31 {
        return Err(Error::arg("Node name too long"));
    }
    Ok(())
}

/// Parses an image name: an option list with `--image-opts`, else `json:{...}`, `file:NAME`
/// or a plain name.
pub fn parse(name: &str, image_opts: bool) -> Result<ImageSpec> {
    if image_opts {
        return from_options(parse_kv_list(name));
    }
    if let Some(json) = name.strip_prefix("json:") {
        let value: serde_json::Value = serde_json::from_str(&standard_json(json))
            .map_err(|e| Error::arg(format!("Could not parse the JSON options: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(Error::arg("Invalid JSON object given"));
        };
        let mut pairs = Vec::new();
        flatten("", &serde_json::Value::Object(map), &mut pairs)?;
        return from_options(pairs);
    }
    if name.starts_with("blkdebug:") {
        return from_options(name_pairs(name, "file.")?);
    }
    if name == "null-co://" {
        return Ok(ImageSpec {
            path: name.into(),
            format: Some("raw".into()),
            null: Some(NullDevice {
                size: qimg::storage::null::DEFAULT_SIZE,
                read_zeroes: false,
            }),
            ..Default::default()
        });
    }
    if let Some(target) = qimg::nbd::remote::Target::parse(name) {
        let target = target?;
        return Ok(ImageSpec {
            path: target.canonical_name(),
            nbd: Some(target),
            ..Default::default()
        });
    }
    Ok(ImageSpec {
        path: strip_file_prefix(name),
        ..Default::default()
    })
}

/// Parses an image name given together with options (qemu-io's `open -o OPTIONS NAME`): the
/// name fills in the file the options leave open, as QEMU's drivers parse it (a `blkdebug:`
/// name gives the blkdebug node's configuration file and image).
pub fn parse_with_options(name: &str, options: Vec<(String, String)>) -> Result<ImageSpec> {
    let driver = |d: &str| options.iter().any(|(k, v)| k == "driver" && v == d);
    let above = driver("blkdebug");
    let mut pairs = if driver("copy-on-read") {
        vec![("file.filename".to_string(), strip_file_prefix(name))]
    } else if above {
        name_pairs(name, "")?
    } else if let Some(json) = name.strip_prefix("json:") {
        let mut pairs = Vec::new();
        let value: serde_json::Value = serde_json::from_str(&standard_json(json))
            .map_err(|e| Error::arg(format!("Could not parse the JSON options: {e}")))?;
        flatten("", &value, &mut pairs)?;
        pairs
    } else {
        let file_driver = options
            .iter()
            .rev()
            .find(|(k, _)| k == "file.driver")
            .map(|(_, v)| v.as_str());
        match file_driver {
            _ if name.starts_with("blkdebug:") => name_pairs(name, "file.")?,
            Some("blkdebug") => name_pairs(name, "file.")?,
            // The name is the inner image's file.
            Some("qcow2" | "raw") => vec![("file.file.filename".into(), strip_file_prefix(name))],
            _ => vec![("filename".to_string(), strip_file_prefix(name))],
        }
    };
    pairs.extend(options);
    from_options(pairs)
}

/// The options a `blkdebug:CONFIG:IMAGE` name stands for, for a blkdebug node at `prefix`
/// (`file.` below a format, `` at the top); a plain name is the node's image.
fn name_pairs(name: &str, prefix: &str) -> Result<Vec<(String, String)>> {
    let mut pairs = vec![(format!("{prefix}driver"), "blkdebug".to_string())];
    let image = match name.strip_prefix("blkdebug:") {
        Some(rest) => {
            let Some((config, image)) = rest.split_once(':') else {
                return Err(Error::arg(
                    "blkdebug requires both config file and image path",
                ));
            };
            if !config.is_empty() {
                pairs.push((format!("{prefix}config"), config.to_string()));
            }
            image
        }
        None => name,
    };
    pairs.push((format!("{prefix}image.filename"), strip_file_prefix(image)));
    Ok(pairs)
}

/// The options of QEMU's `blkdebug` driver that belong to the node itself (not its image).
fn blkdebug_option(key: &str) -> bool {
    matches!(
        key,
        "config"
            | "align"
            | "max-transfer"
            | "opt-write-zero"
            | "max-write-zero"
            | "opt-discard"
            | "max-discard"
    ) || key.starts_with("inject-error.")
        || key.starts_with("set-state.")
}

/// The options of QEMU's `nbd` driver: `server.type=unix|inet` with `server.path` or
/// `server.host`/`server.port` (or the legacy `path`, `host`, `port`), `export`,
/// `x-dirty-bitmap` (block status read from that metadata context), and `tls-creds` (the id of
/// a client `tls-creds-x509` object) with `tls-hostname` (the name the server's certificate
/// must carry: by default the host connected to; on a unix socket, none).
fn nbd_target(pairs: &[(String, String)]) -> Result<(String, qimg::nbd::remote::Target)> {
    use qimg::nbd::remote::{Address, Target, DEFAULT_PORT};
    let get = |k: &str| {
        pairs
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    for (k, _) in pairs {
        let known = [
            "driver",
            "server.type",
            "server.path",
            "server.host",
            "server.port",
            "path",
            "host",
            "port",
            "export",
            "x-dirty-bitmap",
            "tls-creds",
            "tls-hostname",
            "read-only",
        ];
        if !known.contains(&k.as_str()) {
            return Err(Error::unsupported(format!(
                "Option '{k}' of the nbd driver is not supported"
            )));
        }
    }
    let path = get("server.path").or_else(|| get("path"));
    let host = get("server.host").or_else(|| get("host"));
    let port = get("server.port").or_else(|| get("port"));
    let kind = get("server.type");
    let address = match (kind.as_deref(), path, host) {
        (Some("unix") | None, Some(p), None) => Address::Unix(p),
        (Some("inet") | None, None, Some(h)) => {
            let port = match port {
                None => DEFAULT_PORT,
                Some(p) => p
                    .parse()
                    .map_err(|_| Error::arg(format!("Invalid port '{p}'")))?,
            };
            Address::Tcp { host: h, port }
        }
        (_, Some(_), Some(_)) => {
            return Err(Error::arg("nbd: 'path' and 'host' are mutually exclusive"))
        }
        _ => return Err(Error::arg("nbd: either 'path' or 'host' must be given")),
    };
    let tls = match get("tls-creds") {
        None if get("tls-hostname").is_some() => {
            return Err(Error::arg("tls-hostname needs tls-creds"))
        }
        None => None,
        Some(id) => {
            let creds = super::objects::tls_client(&id)?;
            let hostname = get("tls-hostname").or(match &address {
                Address::Tcp { host, .. } => Some(host.clone()),
                Address::Unix(_) => None,
            });
            Some(qimg::nbd::tls::TlsClient::new(&creds, hostname.as_deref())?)
        }
    };
    let target = Target {
        address,
        export: get("export").unwrap_or_default(),
        status_context: get("x-dirty-bitmap"),
        bare: true,
        tls,
    };
    Ok((target.canonical_name(), target))
}

/// The file name behind a `file:` prefix, as QEMU's file protocol takes it: a relative name
/// with a colon before its first slash gets `./` in front, so that it cannot be read as a
/// protocol prefix again (and the image's name, and its backing file's path, show it).
pub fn strip_file_prefix(name: &str) -> String {
    match name.strip_prefix("file:") {
        Some(rest) => {
            let colon_first = rest
                .find(':')
                .is_some_and(|c| rest.find('/').is_none_or(|s| c < s));
            if !rest.starts_with('/') && colon_first {
                format!("./{rest}")
            } else {
                rest.to_string()
            }
        }
        None => name.to_string(),
    }
}

/// QEMU's JSON with single-quoted strings turned into standard JSON.
fn standard_json(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    out.push(c);
                    match c {
                        '\\' => out.extend(chars.next()),
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                out.push('"');
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some('\'') => out.push('\''),
                            Some(e) => {
                                out.push('\\');
                                out.push(e);
                            }
                            None => {}
                        },
                        '"' => out.push_str("\\\""),
                        '\'' => break,
                        c => out.push(c),
                    }
                }
                out.push('"');
            }
            c => out.push(c),
        }
    }
    out
}

/// Nested objects become dotted keys; scalars become option values (`true` is `on`).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) -> Result<()> {
    use serde_json::Value;
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out)?;
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.into())),
        Value::Number(n) => out.push((prefix.to_string(), n.to_string())),
        Value::Null if prefix == "backing" => out.push((prefix.to_string(), String::new())),
        Value::Null => {
            return Err(Error::arg(format!(
                "Option '{prefix}': null is only taken for 'backing'"
            )))
        }
        // QEMU's flattening: list elements are numbered keys.
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out)?;
            }
        }
    }
    Ok(())
}

/// The `null-co` device of the options under `prefix` (QEMU's `size`, default 1 GiB, and
/// `read-zeroes`).
fn null_device(pairs: &[(String, String)], prefix: &str) -> Result<NullDevice> {
    let mut d = NullDevice {
        size: qimg::storage::null::DEFAULT_SIZE,
        read_zeroes: false,
    };
    for (k, v) in pairs {
        let Some(k) = k.strip_prefix(prefix) else {
            continue;
        };
        match k {
            "driver" => {}
            "size" => {
                d.size = qimg::size::parse_size(v)
                    .map_err(|_| Error::arg("Parameter 'size' expects a size"))?
            }
            "read-zeroes" => d.read_zeroes = qimg::size::parse_bool(k, v)?,
            "filename" if v == "null-co://" => {}
            other => {
                return Err(Error::unsupported(format!(
                    "Option '{prefix}{other}' of the null-co driver is not supported"
                )))
            }
        }
    }
    Ok(d)
}

/// The options of a filter driver's `file` child (its only other option is `driver`).
fn filter_child(pairs: Vec<(String, String)>, driver: &str) -> Result<Vec<(String, String)>> {
    let mut child = Vec::new();
    for (k, v) in pairs {
        if let Some(k) = k.strip_prefix("file.") {
            child.push((k.to_string(), v));
        } else if k != "driver" {
            return Err(Error::arg(format!(
                "Invalid parameter '{k}' (of the {driver} driver)"
            )));
        }
    }
    Ok(child)
}

/// Interprets flattened options.
fn from_options(pairs: Vec<(String, String)>) -> Result<ImageSpec> {
    if pairs.iter().any(|(k, v)| k == "driver" && v == "nbd") {
        let (path, target) = nbd_target(&pairs)?;
        let read_only = match pairs.iter().find(|(k, _)| k == "read-only") {
            Some((k, v)) => qimg::size::parse_bool(k, v)?,
            None => false,
        };
        return Ok(ImageSpec {
            path,
            format: Some("raw".into()),
            read_only,
            nbd: Some(target),
            ..Default::default()
        });
    }
    if pairs.iter().any(|(k, v)| k == "driver" && v == "blkdebug") {
        let mut image = Vec::new();
        let mut node = Vec::new();
        for (k, v) in pairs {
            if let Some(k) = k.strip_prefix("image.") {
                image.push((k.to_string(), v));
            } else if k == "x-image" || k == "filename" {
                image.push(("filename".to_string(), v));
            } else if blkdebug_option(&k) {
                node.push((k, v));
            } else if k != "driver" {
                return Err(Error::arg(format!(
                    "Invalid parameter '{k}' (of the blkdebug driver)"
                )));
            }
        }
        let mut spec = from_options(image)?;
        if spec.blkdebug_above.is_some() {
            return Err(Error::unsupported(
                "Nested blkdebug nodes are not supported",
            ));
        }
        spec.blkdebug_above = Some(node);
        return Ok(spec);
    }
    if pairs.iter().any(|(k, v)| k == "driver" && v == "compress") {
        // QEMU's `compress` filter: every write of the qcow2 image below is stored
        // compressed, which is what qcow2's `compress=on` runtime option does here.
        let mut spec = from_options(filter_child(pairs, "compress")?)?;
        match spec.format.as_deref() {
            Some("qcow2") => {}
            Some(other) => {
                return Err(Error::unsupported(format!(
                    "Compression is not supported for underlying format: {other}"
                )))
            }
            None => {
                return Err(Error::arg(
                    "The compress driver needs its format below (file.driver=qcow2)",
                ))
            }
        }
        spec.runtime.push("compress=on".into());
        return Ok(spec);
    }
    if pairs
        .iter()
        .any(|(k, v)| k == "driver" && v == "copy-on-read")
    {
        let mut spec = from_options(filter_child(pairs, "copy-on-read")?)?;
        if spec.copy_on_read {
            return Err(Error::unsupported(
                "Nested copy-on-read nodes are not supported",
            ));
        }
        spec.copy_on_read = true;
        return Ok(spec);
    }
    if pairs
        .iter()
        .any(|(k, v)| k == "file.driver" && v == "quorum")
    {
        let (sub, mut outer): (Vec<_>, Vec<_>) =
            pairs.into_iter().partition(|(k, _)| k.starts_with("file."));
        let quorum = quorum_spec(&sub)?;
        outer.push(("file.filename".into(), quorum.qemu_name()));
        let mut spec = from_options(outer)?;
        spec.quorum = Some(quorum);
        return Ok(spec);
    }
    if pairs.iter().any(|(k, v)| k == "driver" && v == "quorum") {
        return Err(Error::unsupported(
            "A quorum is supported as a format's file only (file.driver=quorum)",
        ));
    }
    if pairs
        .iter()
        .any(|(k, v)| k == "file.driver" && matches!(v.as_str(), "qcow2" | "raw"))
    {
        // A format over a format: the file child is an image of its own.
        let (child, outer): (Vec<_>, Vec<_>) =
            pairs.into_iter().partition(|(k, _)| k.starts_with("file."));
        let child: Vec<(String, String)> = child
            .into_iter()
            .map(|(k, v)| (k["file.".len()..].to_string(), v))
            .collect();
        let inner = from_options(child)?;
        if inner.copy_on_read || inner.blkdebug_above.is_some() {
            return Err(Error::unsupported(
                "Only a format over a file (or over blkdebug) is supported below another format",
            ));
        }
        let mut outer = outer;
        outer.push(("file.filename".into(), inner.path.clone()));
        let mut spec = from_options(outer)?;
        spec.inner = Some(Box::new(inner));
        return Ok(spec);
    }
    if pairs.iter().any(|(k, v)| k == "driver" && v == "null-co") {
        // The null-co node itself, no format above it (as `driver=file` is the file's).
        return null_device(&pairs, "").map(|null| ImageSpec {
            path: "null-co://".into(),
            format: Some("raw".into()),
            null: Some(null),
            protocol_driver: Some("null-co"),
            ..Default::default()
        });
    }
    let mut spec = ImageSpec::default();
    let mut path = None;
    let mut runtime = Vec::new();
    let null_pairs = pairs.clone();
    let null_data_file = pairs
        .iter()
        .any(|(k, v)| k == "data-file.driver" && v == "null-co");
    let blkdebug_file = pairs
        .iter()
        .any(|(k, v)| k == "file.driver" && v == "blkdebug");
    // A data file given as a raw node over a file or a blkdebug node: read as an image of its
    // own.
    let mut pairs = pairs;
    if pairs
        .iter()
        .any(|(k, v)| k == "data-file.driver" && v == "raw")
    {
        let (sub, rest): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(k, _)| k.starts_with("data-file."));
        pairs = rest;
        let sub: Vec<(String, String)> = sub
            .into_iter()
            .map(|(k, v)| (k["data-file.".len()..].to_string(), v))
            .collect();
        let d = from_options(sub)?;
        if d.format.as_deref() != Some("raw") || !d.runtime.is_empty() || d.blkdebug_above.is_some()
        {
            return Err(Error::unsupported(
                "A data file node other than raw over a file (or over blkdebug) is not supported",
            ));
        }
        spec.data_file = Some(match d.blkdebug {
            Some(b) => DataFileSpec::Blkdebug(
                d.path.into(),
                qimg::storage::blkdebug::Config::from_options(&b)?,
            ),
            None => DataFileSpec::Path(d.path.into()),
        });
    }
    let mut blkdebug = Vec::new();
    for (k, v) in pairs {
        if blkdebug_file {
            if let Some(key) = k.strip_prefix("file.") {
                match key {
                    "driver" => {}
                    "image.filename" | "x-image" | "image.file.filename" => path = Some(v),
                    "image.driver" | "image.file.driver" if v == "file" => {}
                    key if blkdebug_option(key) => blkdebug.push((key.to_string(), v)),
                    key if key.starts_with("image.") => {
                        return Err(Error::unsupported(format!(
                            "Option '{k}' is not supported (blkdebug's image is a file: \
                             file.image.filename=NAME)"
                        )))
                    }
                    _ => {
                        return Err(Error::arg(format!(
                            "Invalid parameter '{key}' (of the blkdebug driver)"
                        )))
                    }
                }
                continue;
            }
        }
        if k == "file.driver" && v == "blkdebug" {
            continue;
        }
        match k.as_str() {
            "driver" => match v.as_str() {
                "qcow2" | "raw" => spec.format = Some(v),
                "file" | "host_device" | "host_cdrom" => {
                    spec.format = Some("raw".into());
                    spec.protocol_driver = Some(match v.as_str() {
                        "file" => "file",
                        "host_device" => "host_device",
                        _ => "host_cdrom",
                    });
                }
                other => {
                    return Err(Error::unsupported(format!(
                        "Block driver '{other}' is not supported"
                    )))
                }
            },
            "file.driver" => {
                if v != "file" {
                    return Err(Error::unsupported(format!(
                        "Block driver '{v}' is not supported (only 'file' below a format)"
                    )));
                }
            }
            "filename" | "file.filename" => path = Some(v),
            "file" => {
                return Err(Error::unsupported(
                    "A node reference as 'file' is not supported; use file.filename",
                ))
            }
            "backing" if v.is_empty() => spec.no_backing = true,
            "read-only" => spec.read_only = qimg::size::parse_bool(&k, &v)?,
            k if k == "node-name" || k.ends_with(".node-name") => check_node_name(&v)?,
            "file.locking" | "locking" => runtime.push(format!("locking={}", v.replace(',', ",,"))),
            "backing.driver" => runtime.push(format!("backing.driver={v}")),
            "data-file.filename" => spec.data_file = Some(DataFileSpec::Path(v.into())),
            "data-file.driver" if v == "file" => {}
            "data-file.driver" if v == "null-co" => {
                spec.data_file = Some(DataFileSpec::Null(null_device(&null_pairs, "data-file.")?))
            }
            k if k.starts_with("data-file.") && null_data_file => {}
            k if k.starts_with("data-file") => {
                return Err(Error::unsupported(format!(
                    "Option '{k}' is not supported (the data file is given as \
                     data-file.filename=NAME)"
                )))
            }
            k if k.starts_with("backing") || k.starts_with("file.") => {
                return Err(Error::unsupported(format!("Option '{k}' is not supported")))
            }
            _ => runtime.push(format!("{k}={}", v.replace(',', ",,"))),
        }
    }
    let Some(path) = path else {
        return Err(Error::arg(
            "The image options name no file (file.filename=NAME)",
        ));
    };
    spec.path = path;
    spec.runtime = runtime;
    spec.blkdebug = blkdebug_file.then_some(blkdebug);
    Ok(spec)
}

/// The quorum a format's `file.*` options describe (QEMU's `quorum` driver options, children
/// given as files).
fn quorum_spec(pairs: &[(String, String)]) -> Result<qimg::storage::quorum::QuorumSpec> {
    use qimg::storage::quorum::{QuorumSpec, ReadPattern};
    let mut threshold = 0;
    let mut read_pattern = ReadPattern::Quorum;
    let mut children: std::collections::BTreeMap<usize, Option<String>> = Default::default();
    for (k, v) in pairs {
        let key = &k["file.".len()..];
        if let Some(rest) = key.strip_prefix("children.") {
            let (n, opt) = rest.split_once('.').unwrap_or((rest, ""));
            let n: usize = n.parse().map_err(|_| {
                Error::unsupported(format!(
                    "Option '{k}' is not supported (children are given as a list of files)"
                ))
            })?;
            let child = children.entry(n).or_default();
            match opt {
                "filename" => *child = Some(v.clone()),
                "driver" if v == "file" => {}
                "driver" => {
                    return Err(Error::unsupported(format!(
                        "Block driver '{v}' is not supported as a quorum child (only 'file')"
                    )))
                }
                "node-name" => check_node_name(v)?,
                _ => return Err(Error::unsupported(format!("Option '{k}' is not supported"))),
            }
            continue;
        }
        match key {
            "driver" => {}
            "node-name" => check_node_name(v)?,
            "vote-threshold" => {
                threshold = v.parse().map_err(|_| {
                    Error::arg(format!(
                        "Parameter 'vote-threshold' expects a number, not '{v}'"
                    ))
                })?
            }
            "read-pattern" => {
                read_pattern = match v.as_str() {
                    "quorum" => ReadPattern::Quorum,
                    "fifo" => ReadPattern::Fifo,
                    _ => return Err(Error::arg("Please set read-pattern as fifo or quorum")),
                }
            }
            "blkverify" | "rewrite-corrupted" if !qimg::size::parse_bool(k, v)? => {}
            "blkverify" | "rewrite-corrupted" => {
                return Err(Error::unsupported(format!(
                    "The quorum option '{key}' is not supported"
                )))
            }
            _ => return Err(Error::unsupported(format!("Option '{k}' is not supported"))),
        }
    }
    let children = children
        .into_iter()
        .map(|(n, f)| {
            f.map(Into::into).ok_or_else(|| {
                Error::arg(format!(
                    "Quorum child {n} names no file (children.{n}.filename)"
                ))
            })
        })
        .collect::<Result<Vec<std::path::PathBuf>>>()?;
    let spec = QuorumSpec {
        children,
        threshold,
        read_pattern,
    };
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_file_prefix() {
        assert_eq!(parse("a.qcow2", false).unwrap().path, "a.qcow2");
        assert_eq!(parse("file:/d/a:b", false).unwrap().path, "/d/a:b");
        assert_eq!(parse("file:image:top", false).unwrap().path, "./image:top");
        assert_eq!(parse("file:sub/a:b", false).unwrap().path, "sub/a:b");
        assert_eq!(parse("file:a/b", false).unwrap().path, "a/b");
    }

    #[test]
    fn json_nested_dotted_single_quoted() {
        let want = ImageSpec {
            path: "/t/x.qcow2".into(),
            format: Some("qcow2".into()),
            ..Default::default()
        };
        for s in [
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/t/x.qcow2"}}"#,
            r#"json:{"driver":"qcow2","file.filename":"/t/x.qcow2"}"#,
            "json:{ 'driver': 'qcow2', 'file': { 'driver': 'file', 'filename': '/t/x.qcow2' } }",
        ] {
            assert_eq!(parse(s, false).unwrap(), want, "{s}");
        }
        let s = parse(
            "json:{'driver':'qcow2','file':{'filename':'x'},'backing':null,'lazy-refcounts':true,\
             'cache-size':1048576,'file.locking':'off'}",
            false,
        )
        .unwrap();
        assert!(s.no_backing);
        assert_eq!(
            s.runtime,
            ["lazy-refcounts=on", "cache-size=1048576", "locking=off"]
        );
    }

    #[test]
    fn image_opts() {
        let s = parse(
            "driver=qcow2,file.driver=file,file.filename=/a,,b,overlap-check=none",
            true,
        )
        .unwrap();
        assert_eq!(s.path, "/a,b");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        assert_eq!(s.runtime, ["overlap-check=none"]);
    }

    #[test]
    fn refusals() {
        for (s, io) in [
            ("driver=blkdebug,image.filename=x,bogus=1", true),
            (
                "driver=qcow2,file.driver=blkdebug,file.image.driver=qcow2,file.image.filename=x",
                true,
            ),
            ("blkdebug:x", false),
            ("driver=qcow2", true),
            ("driver=qcow2,file.filename=x,backing.file.filename=y", true),
            ("json:{'driver':'qcow2'", false),
            ("json:[1]", false),
            ("json:{'driver':'qcow2','file':'node0'}", false),
        ] {
            assert!(parse(s, io).is_err(), "{s}");
        }
    }

    #[test]
    fn blkdebug_below_and_above() {
        let kv = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let s = parse("blkdebug:/c.conf:/t/a.qcow2", false).unwrap();
        assert_eq!(s.path, "/t/a.qcow2");
        assert_eq!(s.blkdebug, Some(kv(&[("config", "/c.conf")])));
        let s = parse(
            "json:{'driver':'qcow2','file':{'driver':'blkdebug','image.filename':'a',\
             'set-state':[{'event':'write_aio','new_state':2}],\
             'inject-error':[{'event':'write_aio','state':2}]}}",
            false,
        )
        .unwrap();
        assert_eq!(s.path, "a");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        assert_eq!(
            s.blkdebug,
            Some(kv(&[
                ("set-state.0.event", "write_aio"),
                ("set-state.0.new_state", "2"),
                ("inject-error.0.event", "write_aio"),
                ("inject-error.0.state", "2"),
            ]))
        );
        let s = parse_with_options(
            "blkdebug::/t/a.qcow2",
            kv(&[("driver", "qcow2"), ("file.align", "4k")]),
        )
        .unwrap();
        assert_eq!(
            (s.path.as_str(), s.format.as_deref()),
            ("/t/a.qcow2", Some("qcow2"))
        );
        assert_eq!(s.blkdebug, Some(kv(&[("align", "4k")])));
        let s = parse_with_options(
            "blkdebug::/t/a.qcow2",
            kv(&[
                ("driver", "blkdebug"),
                ("image.driver", "qcow2"),
                ("align", "512"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (s.path.as_str(), s.format.as_deref()),
            ("/t/a.qcow2", Some("qcow2"))
        );
        assert_eq!(s.blkdebug, None);
        assert_eq!(s.blkdebug_above, Some(kv(&[("align", "512")])));
        let s = parse_with_options(
            "/t/a.qcow2",
            kv(&[
                ("driver", "copy-on-read"),
                ("file.driver", "blkdebug"),
                ("file.config", "/c"),
                ("file.image.driver", "qcow2"),
            ]),
        )
        .unwrap();
        assert_eq!((s.path.as_str(), s.copy_on_read), ("/t/a.qcow2", true));
        assert_eq!(s.blkdebug_above, Some(kv(&[("config", "/c")])));
        let s = parse_with_options(
            "/t/a.qcow2",
            kv(&[("driver", "qcow2"), ("file.driver", "qcow2")]),
        )
        .unwrap();
        let inner = s.inner.as_deref().expect("nested");
        assert_eq!(
            (inner.path.as_str(), inner.format.as_deref()),
            ("/t/a.qcow2", Some("qcow2"))
        );
        assert_eq!(
            (s.path.as_str(), s.format.as_deref()),
            ("/t/a.qcow2", Some("qcow2"))
        );
        let s = parse_with_options("/t/a.qcow2", kv(&[("driver", "qcow2")])).unwrap();
        assert_eq!(
            (s.path.as_str(), s.blkdebug.is_none()),
            ("/t/a.qcow2", true)
        );
    }
}
