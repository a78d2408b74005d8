//! Which TLS clients may connect (qemu-nbd's `--tls-authz`).
//!
//! A client's identity is the distinguished name of the certificate it presented, written the
//! way QEMU writes it (GnuTLS's form: the name's parts in the certificate's order, short attribute
//! names, RFC 4514 escapes), because that string is what users put in QEMU's authorization
//! objects: `authz-simple` (one identity), `authz-list` (rules matched in order, exact or glob,
//! each allowing or denying, then a default) and `authz-listfile` (the same list in a JSON file,
//! read again on every check when `refresh` is on, so edits take effect without a restart).
//!
//! The certificate has been verified against the CA before its name is read here; the parser is
//! still written for hostile input (lengths checked, no recursion on nesting it does not expect).

use crate::error::{Error, Result};
use std::path::PathBuf;

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Allow,
    Deny,
}

impl Policy {
    fn parse(s: &str) -> Result<Policy> {
        match s {
            "allow" => Ok(Policy::Allow),
            "deny" => Ok(Policy::Deny),
            other => Err(Error::arg(format!(
                "Parameter 'policy' does not accept value '{other}'"
            ))),
        }
    }
}

/// One rule of a list: an identity or a glob pattern (`*`, `?`, `[...]`, `\` escapes).
#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: String,
    pub glob: bool,
    pub policy: Policy,
}

/// QEMU's `authz-list`: the first matching rule decides, else the default policy.
#[derive(Clone, Debug)]
pub struct AuthzList {
    pub rules: Vec<Rule>,
    pub policy: Policy,
}

impl AuthzList {
    fn decide(&self, identity: &str) -> bool {
        let policy = self
            .rules
            .iter()
            .find(|r| {
                if r.glob {
                    glob_match(r.pattern.as_bytes(), identity.as_bytes())
                } else {
                    r.pattern == identity
                }
            })
            .map_or(self.policy, |r| r.policy);
        policy == Policy::Allow
    }

    /// Reads `authz-listfile`'s JSON: `{"policy": "deny", "rules": [{"match": "...", "policy":
    /// "allow", "format": "exact"|"glob"}, ...]}`.
    fn from_json(text: &str) -> Result<AuthzList> {
        let bad = |why: &str| Error::arg(format!("Invalid authorization list: {why}"));
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
        let policy = match v.get("policy") {
            None => Policy::Deny,
            Some(p) => Policy::parse(p.as_str().ok_or_else(|| bad("'policy' is not a string"))?)?,
        };
        let mut rules = Vec::new();
        if let Some(list) = v.get("rules") {
            for r in list
                .as_array()
                .ok_or_else(|| bad("'rules' is not a list"))?
            {
                let field = |k: &str| r.get(k).and_then(|x| x.as_str());
                rules.push(Rule {
                    pattern: field("match")
                        .ok_or_else(|| bad("a rule has no 'match'"))?
                        .to_string(),
                    glob: parse_format(field("format").unwrap_or("exact"))?,
                    policy: Policy::parse(field("policy").unwrap_or("deny"))?,
                });
            }
        }
        Ok(AuthzList { rules, policy })
    }
}

/// A rule's `format`: exact (false) or glob (true).
fn parse_format(s: &str) -> Result<bool> {
    match s {
        "exact" => Ok(false),
        "glob" => Ok(true),
        other => Err(Error::arg(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// An authorization object.
#[derive(Clone, Debug)]
pub enum Authz {
    /// `authz-simple,identity=NAME`.
    Simple(String),
    /// `authz-list,policy=...,rules.N.match=...,rules.N.policy=...,rules.N.format=...`.
    List(AuthzList),
    /// `authz-listfile,filename=FILE[,refresh=on|off]`: with `refresh` (QEMU's default) the file
    /// is read for every check; without, once.
    ListFile {
        path: PathBuf,
        refresh: bool,
        loaded: AuthzList,
    },
}

impl Authz {
    /// Builds the object of QEMU type `kind` from its `--object` properties (`id` and
    /// `qom-type` already taken out).
    pub fn from_object(kind: &str, props: &[(String, String)]) -> Result<Authz> {
        let unknown = |k: &str| {
            Err(Error::unsupported(format!(
                "Property '{k}' of {kind} is not supported"
            )))
        };
        match kind {
            "authz-simple" => {
                let mut identity = None;
                for (k, v) in props {
                    match k.as_str() {
                        "identity" => identity = Some(v.clone()),
                        other => return unknown(other),
                    }
                }
                identity
                    .map(Authz::Simple)
                    .ok_or_else(|| Error::arg("Parameter 'identity' is missing"))
            }
            "authz-list" => {
                let mut policy = Policy::Deny;
                let mut rules: std::collections::BTreeMap<u64, (Option<String>, bool, Policy)> =
                    Default::default();
                for (k, v) in props {
                    if k == "policy" {
                        policy = Policy::parse(v)?;
                        continue;
                    }
                    let Some((n, field)) = k
                        .strip_prefix("rules.")
                        .and_then(|r| r.split_once('.'))
                        .and_then(|(n, f)| Some((n.parse::<u64>().ok()?, f)))
                    else {
                        return unknown(k);
                    };
                    let r = rules.entry(n).or_insert((None, false, Policy::Deny));
                    match field {
                        "match" => r.0 = Some(v.clone()),
                        "format" => r.1 = parse_format(v)?,
                        "policy" => r.2 = Policy::parse(v)?,
                        _ => return unknown(k),
                    }
                }
                let rules = rules
                    .into_values()
                    .map(|(pattern, glob, policy)| {
                        Ok(Rule {
                            pattern: pattern
                                .ok_or_else(|| Error::arg("Parameter 'match' is missing"))?,
                            glob,
                            policy,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Authz::List(AuthzList { rules, policy }))
            }
            "authz-listfile" => {
                let mut path = None;
                let mut refresh = true;
                for (k, v) in props {
                    match k.as_str() {
                        "filename" => path = Some(PathBuf::from(v)),
                        "refresh" => refresh = crate::size::parse_bool(k, v)?,
                        other => return unknown(other),
                    }
                }
                let path = path.ok_or_else(|| Error::arg("Parameter 'filename' is missing"))?;
                let loaded = read_list_file(&path)?;
                Ok(Authz::ListFile {
                    path,
                    refresh,
                    loaded,
                })
            }
            other => Err(Error::unsupported(format!(
                "--object {other} is not supported (authorization: authz-simple, authz-list, \
                 authz-listfile)"
            ))),
        }
    }

    /// Whether `identity` may connect. A list file that cannot be read now denies.
    pub fn allows(&self, identity: &str) -> Result<bool> {
        match self {
            Authz::Simple(id) => Ok(id == identity),
            Authz::List(list) => Ok(list.decide(identity)),
            Authz::ListFile {
                path,
                refresh: true,
                ..
            } => Ok(read_list_file(path)?.decide(identity)),
            Authz::ListFile { loaded, .. } => Ok(loaded.decide(identity)),
        }
    }
}

fn read_list_file(path: &std::path::Path) -> Result<AuthzList> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("Unable to read '{}'", path.display()), e))?;
    AuthzList::from_json(&text)
}

/// `fnmatch(pattern, name, 0)`: `*` any run, `?` any one character, `[...]` a class (`!` or
/// `^` negates, ranges with `-`), `\` takes the next character literally. Iterative with one
/// backtrack point, so hostile patterns cost at most pattern × name steps.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class_match(p, pi, s[si]) {
                        if matched {
                            pi = next;
                            si += 1;
                            continue;
                        }
                    } else if s[si] == b'[' {
                        // No closing bracket: a literal '['.
                        pi += 1;
                        si += 1;
                        continue;
                    }
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    pi += 2;
                    si += 1;
                    continue;
                }
                b'\\' if pi + 1 < p.len() => {}
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches `c` against the class starting at `p[start] == '['`: `(matched, index after ']')`,
/// or `None` when the class is not closed.
fn class_match(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let lo = p[i];
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            if lo <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if lo == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// The subject of an X.509 certificate (DER) as QEMU names TLS clients: its relative names in
/// the certificate's order separated by `,`, the attributes of a multi-valued one by `+`,
/// GnuTLS's short names (`CN`, `O`, `EMAIL`, ...; dotted numbers for others), string values
/// with RFC 4514 escapes, other values as `#` and their DER in hex.
pub fn subject_name(cert: &[u8]) -> Result<String> {
    let bad = || Error::InvalidImage("malformed client certificate".into());
    let (cert_body, _) = der(cert, 0x30).ok_or_else(bad)?;
    let (tbs, _) = der(cert_body, 0x30).ok_or_else(bad)?;
    let mut rest = tbs;
    // version [0] (optional), serialNumber, signature, issuer, validity, subject
    if rest.first() == Some(&0xa0) {
        rest = skip(rest).ok_or_else(bad)?;
    }
    for _ in 0..4 {
        rest = skip(rest).ok_or_else(bad)?;
    }
    let (mut name, _) = der(rest, 0x30).ok_or_else(bad)?;
    let mut out = String::new();
    while !name.is_empty() {
        let (mut rdn, after) = der(name, 0x31).ok_or_else(bad)?;
        name = after;
        if !out.is_empty() {
            out.push(',');
        }
        let mut first = true;
        while !rdn.is_empty() {
            let (atv, after) = der(rdn, 0x30).ok_or_else(bad)?;
            rdn = after;
            let (oid, value) = der(atv, 0x06).ok_or_else(bad)?;
            if !first {
                out.push('+');
            }
            first = false;
            out.push_str(&attribute_name(oid));
            out.push('=');
            out.push_str(&attribute_value(value).ok_or_else(bad)?);
        }
    }
    Ok(out)
}

/// One DER element of tag `tag` at the start of `b`: `(contents, rest)`.
fn der(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    if *b.first()? != tag {
        return None;
    }
    let (len, hdr) = der_len(&b[1..])?;
    let start = 1 + hdr;
    let end = start.checked_add(len)?;
    Some((b.get(start..end)?, &b[end..]))
}

/// Skips one DER element of any tag.
fn skip(b: &[u8]) -> Option<&[u8]> {
    let (len, hdr) = der_len(b.get(1..)?)?;
    b.get((1 + hdr).checked_add(len)?..)
}

/// A DER length: `(length, bytes it took)`.
fn der_len(b: &[u8]) -> Option<(usize, usize)> {
    let first = *b.first()?;
    if first < 0x80 {
        return Some((first as usize, 1));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for &x in b.get(1..1 + n)? {
        len = (len << 8) | x as usize;
    }
    Some((len, 1 + n))
}

/// GnuTLS's short name for an attribute type, or its dotted number.
fn attribute_name(oid: &[u8]) -> String {
    const X520: &[(u8, &str)] = &[
        (3, "CN"),
        (4, "surName"),
        (5, "serialNumber"),
        (6, "C"),
        (7, "L"),
        (8, "ST"),
        (9, "street"),
        (10, "O"),
        (11, "OU"),
        (12, "title"),
        (13, "description"),
        (15, "businessCategory"),
        (17, "postalCode"),
        (41, "name"),
        (42, "givenName"),
        (43, "initials"),
        (44, "generationQualifier"),
        (46, "dnQualifier"),
        (65, "pseudonym"),
    ];
    if let [0x55, 0x04, n] = oid {
        if let Some((_, name)) = X520.iter().find(|(x, _)| x == n) {
            return name.to_string();
        }
    }
    let dotted = dotted_oid(oid);
    match dotted.as_str() {
        "0.9.2342.19200300.100.1.25" => "DC".into(),
        "0.9.2342.19200300.100.1.1" => "UID".into(),
        "1.2.840.113549.1.9.1" => "EMAIL".into(),
        _ => dotted,
    }
}

fn dotted_oid(oid: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut acc = 0u64;
    for &b in oid {
        acc = (acc << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (acc / 40).min(2);
                parts.push(first);
                parts.push(acc - first * 40);
            } else {
                parts.push(acc);
            }
            acc = 0;
        }
    }
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// An attribute's value (a whole DER element): string types as text with RFC 4514 escapes,
/// anything else as `#` and hex.
fn attribute_value(v: &[u8]) -> Option<String> {
    let tag = *v.first()?;
    let (body, _) = der(v, tag)?;
    let text = match tag {
        // UTF8String, PrintableString, IA5String, TeletexString, VisibleString
        0x0c | 0x13 | 0x16 | 0x14 | 0x1a => String::from_utf8_lossy(body).into_owned(),
        // BMPString (UTF-16BE)
        0x1e => {
            let units: Vec<u16> = body
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        // UniversalString (UTF-32BE)
        0x1c => body
            .chunks_exact(4)
            .map(|c| {
                char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
        _ => {
            let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
            return Some(format!("#{hex}"));
        }
    };
    Some(escape(&text))
}

/// RFC 4514 escapes: `,+"\<>;` anywhere, `#` or a space first, a space last.
fn escape(s: &str) -> String {
    let n = s.chars().count();
    let mut out = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i + 1 == n && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_like_fnmatch() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("CN=*", "CN=client"));
        assert!(m("*,O=Example*", "C=GB,O=Example Org,CN=x"));
        assert!(!m("CN=?", "CN=ab"));
        assert!(m("CN=[a-c]x", "CN=bx"));
        assert!(!m("CN=[!a-c]x", "CN=bx"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
        assert!(m("", ""));
        assert!(!m("", "x"));
        assert!(m("***", "abc"));
        // Many stars over a long name finish quickly.
        let long = "a".repeat(5000);
        assert!(!m(&format!("{}b", "*a".repeat(50)), &long));
    }

    #[test]
    fn lists_decide_in_order() {
        let list = AuthzList::from_json(
            r#"{"policy": "deny", "rules": [
                {"match": "CN=bad*", "policy": "deny", "format": "glob"},
                {"match": "CN=*", "policy": "allow", "format": "glob"},
                {"match": "O=x", "policy": "allow"}]}"#,
        )
        .unwrap();
        assert!(list.decide("CN=good"));
        assert!(!list.decide("CN=badone"));
        assert!(list.decide("O=x"));
        assert!(!list.decide("O=y"));
        let props: Vec<(String, String)> = [
            ("policy", "allow"),
            ("rules.1.match", "CN=b"),
            ("rules.0.match", "CN=a"),
            ("rules.0.policy", "deny"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let a = Authz::from_object("authz-list", &props).unwrap();
        assert!(!a.allows("CN=a").unwrap());
        assert!(!a.allows("CN=b").unwrap()); // rule 1 denies by default
        assert!(a.allows("CN=c").unwrap());
        assert!(Authz::from_object("authz-pam", &[]).is_err());
    }

    #[test]
    fn list_files_are_read_again_with_refresh() {
        let path = std::env::temp_dir().join(format!("qimg-authz-{}.json", std::process::id()));
        let write = |policy: &str| {
            std::fs::write(&path, format!(r#"{{"policy": "{policy}"}}"#)).unwrap();
        };
        let object = |refresh: &str| {
            let props = [
                ("filename".to_string(), path.display().to_string()),
                ("refresh".to_string(), refresh.to_string()),
            ];
            Authz::from_object("authz-listfile", &props).unwrap()
        };
        write("allow");
        let (live, fixed) = (object("on"), object("off"));
        assert!(live.allows("CN=x").unwrap() && fixed.allows("CN=x").unwrap());
        write("deny");
        assert!(!live.allows("CN=x").unwrap());
        assert!(fixed.allows("CN=x").unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(live.allows("CN=x").is_err());
    }

    #[test]
    fn names_escape_and_truncated_certificates_fail() {
        assert_eq!(escape(" a,b+c "), "\\ a\\,b\\+c\\ ");
        assert_eq!(escape("#x=y"), "\\#x=y");
        assert_eq!(
            dotted_oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d]),
            "1.2.840.113549"
        );
        for cut in [0, 1, 5, 40] {
            assert!(subject_name(&[0x30, 0x82, 0x01, 0x00, 0x30][..cut.min(5)]).is_err());
        }
    }
}
