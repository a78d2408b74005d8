//! QEMU's user-creatable objects (`--object TYPE,id=ID,...`): the ones qimg has a use for,
//! defined once per process and looked up by id where an option names one.
//!
//! - `secret` (`data=` or `file=`, `format=raw|base64`): checked as QEMU checks it; nothing in
//!   qimg uses a secret yet (an encrypted image is refused where it is opened), as in QEMU,
//!   where a secret nobody names does nothing.
//! - `tls-creds-x509` (`endpoint=client|server`, `dir=`, `verify-peer=`): the credentials are
//!   read when the object is defined, as QEMU does, so a missing file is reported before any
//!   image is opened. Client credentials serve NBD images opened with `tls-creds=ID`, server
//!   credentials `qimg serve --tls-creds ID`.
//! - `authz-simple`, `authz-list`, `authz-listfile`: who `qimg serve --tls-authz ID` admits.
//!
//! Other types are refused by name. The registry is process-wide because QEMU's is (its object
//! root): an option in an image name (`driver=nbd,tls-creds=ID`) refers to an object defined
//! on the command line, whatever command or nested name it comes from.

use qimg::nbd::authz::Authz;
use qimg::nbd::tls::{ClientCredentials, TlsServer};
use qimg::{Error, Result};
use std::path::Path;
use std::sync::{Arc, RwLock};

/// One defined object.
#[derive(Clone, Debug)]
pub enum Object {
    Secret,
    TlsClient(ClientCredentials),
    TlsServer(TlsServer),
    Authz(Authz),
}

static DEFINED: RwLock<Vec<(String, Arc<Object>)>> = RwLock::new(Vec::new());

/// Parses and defines `--object` options (in order; an id may be defined once).
pub fn define(objects: &[String]) -> Result<()> {
    let mut parsed: Vec<(String, Arc<Object>)> = Vec::new();
    for o in objects {
        let (id, object) = parse(o)?;
        let taken = |list: &[(String, Arc<Object>)]| list.iter().any(|(i, _)| *i == id);
        if taken(&parsed) || taken(&read()) {
            return Err(Error::arg(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        parsed.push((id, Arc::new(object)));
    }
    match DEFINED.write() {
        Ok(mut list) => list.extend(parsed),
        Err(poisoned) => poisoned.into_inner().extend(parsed),
    }
    Ok(())
}

fn read() -> Vec<(String, Arc<Object>)> {
    match DEFINED.read() {
        Ok(list) => list.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

/// The object defined with `id`.
pub fn get(id: &str) -> Option<Arc<Object>> {
    read().into_iter().find(|(i, _)| i == id).map(|(_, o)| o)
}

/// The credentials a TLS client names with `id` (QEMU's lookup and messages).
pub fn tls_client(id: &str) -> Result<ClientCredentials> {
    match get(id).as_deref() {
        None => Err(Error::arg(format!("No TLS credentials with id '{id}'"))),
        Some(Object::TlsClient(c)) => Ok(c.clone()),
        Some(Object::TlsServer(_)) => {
            Err(Error::arg("Expected TLS credentials for a client endpoint"))
        }
        Some(_) => Err(Error::arg(format!(
            "Object with id '{id}' is not TLS credentials"
        ))),
    }
}

/// The credentials a TLS server names with `id`.
pub fn tls_server(id: &str) -> Result<TlsServer> {
    match get(id).as_deref() {
        None => Err(Error::arg(format!("No TLS credentials with id '{id}'"))),
        Some(Object::TlsServer(s)) => Ok(s.clone()),
        Some(Object::TlsClient(_)) => {
            Err(Error::arg("Expected TLS credentials for a server endpoint"))
        }
        Some(_) => Err(Error::arg(format!(
            "Object with id '{id}' is not TLS credentials"
        ))),
    }
}

/// The authorization object `id`.
pub fn authz(id: &str) -> Result<Authz> {
    match get(id).as_deref() {
        Some(Object::Authz(a)) => Ok(a.clone()),
        Some(_) => Err(Error::arg(format!(
            "Object with id '{id}' is not an authorization object"
        ))),
        None => Err(Error::arg(format!(
            "No authorization object with id '{id}'"
        ))),
    }
}

/// Takes an option out of `pairs` by name.
fn take(pairs: &mut Vec<(String, String)>, key: &str) -> Option<String> {
    let i = pairs.iter().position(|(k, _)| k == key)?;
    Some(pairs.remove(i).1)
}

/// One `--object` option: `TYPE,id=ID,...` or `qom-type=TYPE,id=ID,...`.
fn parse(o: &str) -> Result<(String, Object)> {
    let mut pairs = super::opts::parse_kv_list(o);
    let kind = match take(&mut pairs, "qom-type") {
        Some(k) => k,
        None if !pairs.is_empty() && pairs[0].1 == "on" => pairs.remove(0).0,
        None => {
            return Err(Error::arg(format!(
                "Parameter 'qom-type' is missing in '{o}'"
            )))
        }
    };
    let known = [
        "secret",
        "tls-creds-x509",
        "authz-simple",
        "authz-list",
        "authz-listfile",
    ];
    if !known.contains(&kind.as_str()) {
        return Err(Error::unsupported(format!(
            "--object {kind} is not supported (qimg has {})",
            known.join(", ")
        )));
    }
    let Some(id) = take(&mut pairs, "id") else {
        return Err(Error::arg("Parameter 'id' is missing"));
    };
    let object = match kind.as_str() {
        "secret" => secret(pairs)?,
        "tls-creds-x509" => tls_creds(pairs)?,
        _ => Object::Authz(Authz::from_object(&kind, &pairs)?),
    };
    Ok((id, object))
}

/// `secret`: QEMU's checks (the file is read when the secret is defined).
fn secret(pairs: Vec<(String, String)>) -> Result<Object> {
    let (mut data, mut file, mut format) = (None, None, "raw".to_string());
    for (k, v) in pairs {
        match k.as_str() {
            "data" => data = Some(v),
            "file" => file = Some(v),
            "format" => format = v,
            other => {
                return Err(Error::unsupported(format!(
                    "Property '{other}' of secret is not supported"
                )))
            }
        }
    }
    match (data, file) {
        (Some(_), None) => {}
        (None, Some(f)) => {
            std::fs::read(&f).map_err(|e| Error::io(format!("Unable to read {f}"), e))?;
        }
        (Some(_), Some(_)) => return Err(Error::arg("'data' and 'file' are mutually exclusive")),
        (None, None) => return Err(Error::arg("Either 'file' or 'data' must be provided")),
    }
    match format.as_str() {
        "raw" | "base64" => Ok(Object::Secret),
        other => Err(Error::arg(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// `tls-creds-x509`: the credentials of `dir` in QEMU's layout, loaded now.
fn tls_creds(pairs: Vec<(String, String)>) -> Result<Object> {
    let (mut endpoint, mut dir, mut verify_peer) = ("client".to_string(), None, true);
    for (k, v) in pairs {
        match k.as_str() {
            "endpoint" => endpoint = v,
            "dir" => dir = Some(v),
            "verify-peer" => verify_peer = qimg::size::parse_bool(&k, &v)?,
            other => {
                return Err(Error::unsupported(format!(
                    "Property '{other}' of tls-creds-x509 is not supported"
                )))
            }
        }
    }
    // QEMU falls back to a directory chosen when it was built; qimg has none.
    let Some(dir) = dir else {
        return Err(Error::arg("tls-creds-x509 needs dir=DIR"));
    };
    let dir = Path::new(&dir);
    match endpoint.as_str() {
        // QEMU's client then trusts any server; qimg always checks the server's certificate.
        "client" if !verify_peer => Err(Error::unsupported(
            "verify-peer=off for client credentials is not supported (the server's certificate \
             is always verified)",
        )),
        "client" => ClientCredentials::load(dir).map(Object::TlsClient),
        "server" => TlsServer::from_x509_dir(dir, verify_peer).map(Object::TlsServer),
        other => Err(Error::arg(format!(
            "Parameter 'endpoint' does not accept value '{other}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_and_lookups() {
        assert!(parse("secret,data=x").is_err(), "id is required");
        assert!(parse("memory-backend-ram,id=m,size=1M").is_err());
        assert!(parse("secret,id=s,data=x,file=/dev/null").is_err());
        assert!(parse("secret,id=s,data=x,format=hex").is_err());
        assert!(
            parse("tls-creds-x509,id=t,endpoint=client").is_err(),
            "dir is required"
        );
        let e = parse("tls-creds-x509,id=t,endpoint=client,dir=/nonexistent").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("Unable to access credentials /nonexistent/ca-cert.pem"),
            "{e}"
        );
        define(&["secret,id=objects-test-s,data=x".to_string()]).unwrap();
        assert!(define(&["qom-type=secret,id=objects-test-s,data=y".to_string()]).is_err());
        assert!(matches!(
            get("objects-test-s").as_deref(),
            Some(Object::Secret)
        ));
        let e = tls_client("objects-test-s").unwrap_err().to_string();
        assert_eq!(e, "Object with id 'objects-test-s' is not TLS credentials");
        let e = tls_client("objects-test-none").unwrap_err().to_string();
        assert_eq!(e, "No TLS credentials with id 'objects-test-none'");
    }
}
