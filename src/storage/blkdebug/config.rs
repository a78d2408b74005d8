//! A `blkdebug` node's configuration: rules from QEMU's configuration file syntax and from
//! options (`inject-error.N.KEY`, `set-state.N.KEY`), and the request limits, with QEMU's
//! validation and messages.

use super::{DebugEvent, IoType};
use crate::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Action {
    InjectError {
        iotypes: u8,
        errno: i32,
        once: bool,
        /// The byte offset (`sector` × 512) a request must cover; `None`: any request.
        offset: Option<u64>,
    },
    SetState {
        new_state: i64,
    },
    /// A breakpoint (qemu-io's `break EVENT TAG`): the request that meets the event waits
    /// until it is resumed.
    Suspend {
        tag: String,
    },
}

/// One rule: on `event`, in `state` (0: any), take `action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rule {
    pub(super) event: DebugEvent,
    pub(super) state: i64,
    pub(super) action: Action,
}

/// A `blkdebug` node's configuration: its rules (from a configuration file and from options)
/// and its limits. Built by [`Config::from_options`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The configuration file, as named (for the node's name `blkdebug:CONFIG:IMAGE`).
    pub config_file: Option<String>,
    /// The other options, as given (for the node's name, which is then a `json:` one).
    pub options: Vec<(String, String)>,
    /// In the order QEMU keeps them (its lists insert at the head; see `Blkdebug::event`).
    pub(super) rules: Vec<Rule>,
    pub align: u64,
    pub max_transfer: u64,
    pub opt_write_zero: u64,
    pub max_write_zero: u64,
    pub opt_discard: u64,
    pub max_discard: u64,
}

/// A rule's options, as `(key, value)` pairs in the order given.
type Options = Vec<(String, String)>;

/// The option groups a rule can come from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Group {
    InjectError,
    SetState,
}

impl Config {
    /// The node's configuration from its options (`config`, `align`, the limits,
    /// `inject-error.N.KEY`, `set-state.N.KEY`; keys without the node's prefix). The
    /// configuration file named by `config` is read here. Other keys are refused.
    pub fn from_options(pairs: &[(String, String)]) -> Result<Config> {
        let mut cfg = Config::default();
        // Rules in definition order, per group; file rules first, as QEMU reads them.
        let mut inject: Vec<Vec<(String, String)>> = Vec::new();
        let mut set_state: Vec<Vec<(String, String)>> = Vec::new();
        let mut listed: Vec<(Group, String, Options)> = Vec::new();
        cfg.options = pairs
            .iter()
            .filter(|(k, _)| k != "config")
            .cloned()
            .collect();
        for (k, v) in pairs {
            let size = |what: &str| {
                crate::size::parse_size(v).map_err(|_| {
                    Error::arg(format!(
                        "Parameter '{what}' expects a non-negative number below 2^64"
                    ))
                })
            };
            match k.as_str() {
                "config" => cfg.config_file = Some(v.clone()),
                "align" => cfg.align = size("align")?,
                "max-transfer" => cfg.max_transfer = size("max-transfer")?,
                "opt-write-zero" => cfg.opt_write_zero = size("opt-write-zero")?,
                "max-write-zero" => cfg.max_write_zero = size("max-write-zero")?,
                "opt-discard" => cfg.opt_discard = size("opt-discard")?,
                "max-discard" => cfg.max_discard = size("max-discard")?,
                k => {
                    let (group, rest) = if let Some(r) = k.strip_prefix("inject-error.") {
                        (Group::InjectError, r)
                    } else if let Some(r) = k.strip_prefix("set-state.") {
                        (Group::SetState, r)
                    } else {
                        return Err(Error::arg(format!(
                            "Invalid parameter '{k}' (of the blkdebug driver)"
                        )));
                    };
                    let Some((index, key)) = rest.split_once('.') else {
                        return Err(Error::arg(format!("Invalid parameter '{k}'")));
                    };
                    match listed
                        .iter_mut()
                        .find(|(g, i, _)| *g == group && i == index)
                    {
                        Some((_, _, kv)) => kv.push((key.to_string(), v.clone())),
                        None => listed.push((
                            group,
                            index.to_string(),
                            vec![(key.to_string(), v.clone())],
                        )),
                    }
                }
            }
        }
        if let Some(file) = &cfg.config_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Error::io("Could not read blkdebug config file".to_string(), e))?;
            for (group, kv) in parse_config_file(file, &text)? {
                match group {
                    Group::InjectError => inject.push(kv),
                    Group::SetState => set_state.push(kv),
                }
            }
        }
        // QEMU numbers list elements 0, 1, ...: keep their numeric order.
        listed.sort_by_key(|(_, i, _)| i.parse::<u64>().unwrap_or(u64::MAX));
        for (group, _, kv) in listed {
            match group {
                Group::InjectError => inject.push(kv),
                Group::SetState => set_state.push(kv),
            }
        }
        // QEMU adds inject-error rules, then set-state rules, each at the head of its event's
        // list: the list holds them in reverse.
        let mut rules = Vec::new();
        for kv in &inject {
            rules.push(rule(Group::InjectError, kv)?);
        }
        for kv in &set_state {
            rules.push(rule(Group::SetState, kv)?);
        }
        rules.reverse();
        cfg.rules = rules;
        cfg.check_limits()?;
        Ok(cfg)
    }

    /// QEMU's name for an image of `format` (if known) on this node over the file `image`:
    /// `blkdebug:CONFIG:IMAGE` when the configuration file is all there is, else a `json:`
    /// name with every option.
    pub fn image_name(&self, format: Option<&str>, image: &str) -> String {
        if self.options.is_empty() {
            return format!(
                "blkdebug:{}:{image}",
                self.config_file.as_deref().unwrap_or("")
            );
        }
        let mut node = serde_json::Map::new();
        node.insert("driver".into(), "blkdebug".into());
        if let Some(c) = &self.config_file {
            node.insert("config".into(), c.as_str().into());
        }
        node.insert(
            "image".into(),
            serde_json::json!({"driver": "file", "filename": image}),
        );
        for (k, v) in &self.options {
            node.insert(k.clone(), v.as_str().into());
        }
        let mut top = serde_json::Map::new();
        if let Some(f) = format {
            top.insert("driver".into(), f.into());
        }
        top.insert("file".into(), node.into());
        format!("json:{}", serde_json::Value::Object(top))
    }

    /// QEMU's constraints on the limits (the underlying file's own alignment taken as 1).
    fn check_limits(&self) -> Result<()> {
        const INT_MAX: u64 = i32::MAX as u64;
        let bad = |what: &str, v: u64| {
            Err(Error::arg(format!(
                "Cannot meet constraints with {what} {v}"
            )))
        };
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return bad("align", self.align);
        }
        let align = self.align.max(1);
        let aligned = |v: u64, a: u64| v % a.max(1) == 0;
        if self.max_transfer != 0
            && (self.max_transfer >= INT_MAX || !aligned(self.max_transfer, align))
        {
            return bad("max-transfer", self.max_transfer);
        }
        if self.opt_write_zero != 0
            && (self.opt_write_zero >= INT_MAX || !aligned(self.opt_write_zero, align))
        {
            return bad("opt-write-zero", self.opt_write_zero);
        }
        if self.max_write_zero != 0
            && (self.max_write_zero >= INT_MAX
                || !aligned(self.max_write_zero, self.opt_write_zero.max(align)))
        {
            return bad("max-write-zero", self.max_write_zero);
        }
        if self.opt_discard != 0
            && (self.opt_discard >= INT_MAX || !aligned(self.opt_discard, align))
        {
            return bad("opt-discard", self.opt_discard);
        }
        if self.max_discard != 0
            && (self.max_discard >= INT_MAX
                || !aligned(self.max_discard, self.opt_discard.max(align)))
        {
            return bad("max-discard", self.max_discard);
        }
        Ok(())
    }
}

/// One rule from its options.
fn rule(group: Group, kv: &[(String, String)]) -> Result<Rule> {
    let get = |key: &str| {
        kv.iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let number = |key: &str, default: i64| -> Result<i64> {
        match get(key) {
            None => Ok(default),
            Some(v) => parse_number(v)
                .ok_or_else(|| Error::arg(format!("Parameter '{key}' expects a number"))),
        }
    };
    let allowed: &[&str] = match group {
        Group::InjectError => &[
            "event",
            "state",
            "iotype",
            "errno",
            "sector",
            "once",
            "immediately",
        ],
        Group::SetState => &["event", "state", "new_state"],
    };
    if let Some((k, _)) = kv.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
        return Err(Error::arg(format!("Invalid parameter '{k}'")));
    }
    let Some(event_name) = get("event") else {
        return Err(Error::arg("Missing event name for rule"));
    };
    let event = DebugEvent::parse(event_name).ok_or_else(|| {
        Error::arg(format!(
            "Parameter 'event' does not accept value '{event_name}'"
        ))
    })?;
    if !event.announced() {
        return Err(Error::unsupported(format!(
            "blkdebug event '{event_name}' is not announced by qimg's drivers: a rule on it \
             would never fire"
        )));
    }
    let state = number("state", 0)?;
    let action = match group {
        Group::InjectError => {
            let bool_opt = |key: &str| -> Result<bool> {
                match get(key) {
                    None => Ok(false),
                    Some(v) => crate::size::parse_bool(key, v),
                }
            };
            let iotypes = match get("iotype") {
                None => IoType::DEFAULT_MASK,
                Some(t) => IoType::parse(t)
                    .ok_or_else(|| {
                        Error::arg(format!("Parameter 'iotype' does not accept value '{t}'"))
                    })?
                    .bit(),
            };
            // Any negative sector means "any request" (QEMU takes -1); one past what a byte
            // offset can hold is refused rather than wrapped.
            let sector = number("sector", -1)?;
            let offset = match u64::try_from(sector) {
                Err(_) => None,
                Ok(s) => Some(s.checked_mul(512).ok_or_else(|| {
                    Error::arg(format!("Parameter 'sector' is too large: {sector}"))
                })?),
            };
            let errno = number("errno", 5)?;
            let errno = i32::try_from(errno)
                .ok()
                .filter(|e| (0..4096).contains(e))
                .ok_or_else(|| {
                    Error::arg(format!(
                        "Parameter 'errno' must be between 0 and 4095: {errno}"
                    ))
                })?;
            // `immediately` only decides whether QEMU fails the request before or after
            // yielding once: nothing to do here, but the value must be valid.
            bool_opt("immediately")?;
            Action::InjectError {
                iotypes,
                errno,
                once: bool_opt("once")?,
                offset,
            }
        }
        Group::SetState => Action::SetState {
            new_state: number("new_state", 0)?,
        },
    };
    Ok(Rule {
        event,
        state,
        action,
    })
}

/// A number as QEMU's option parser takes it (decimal, `0x` hex, a leading minus).
fn parse_number(v: &str) -> Option<i64> {
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if neg { -n } else { n })
}

/// QEMU's configuration file syntax: `[group]` lines, `key = "value"` lines, `#` comments.
fn parse_config_file(file: &str, text: &str) -> Result<Vec<(Group, Options)>> {
    let mut groups: Vec<(Group, Vec<(String, String)>)> = Vec::new();
    for (lno, line) in text.lines().enumerate() {
        let at = |msg: &str| Error::arg(format!("{file}:{}: {msg}", lno + 1));
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest
                .split(|c: char| c == ']' || c.is_whitespace())
                .next()
                .unwrap_or("");
            let group = match name {
                "inject-error" => Group::InjectError,
                "set-state" => Group::SetState,
                other => return Err(at(&format!("There is no option group '{other}'"))),
            };
            groups.push((group, Vec::new()));
            continue;
        }
        let parsed = line.split_once('=').and_then(|(k, v)| {
            let key = k.trim();
            let v = v.trim_start();
            let value = v.strip_prefix('"')?;
            let end = value.find('"')?;
            (!key.is_empty() && !key.contains(char::is_whitespace))
                .then(|| (key.to_string(), value[..end].to_string()))
        });
        let Some((key, value)) = parsed else {
            return Err(at("parse error"));
        };
        let Some((_, kv)) = groups.last_mut() else {
            return Err(at("no group defined"));
        };
        kv.push((key, value));
    }
    Ok(groups)
}
