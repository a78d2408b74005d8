//! An NBD server: exports one image to NBD clients (QEMU, libnbd tools, the Linux kernel).
//!
//! Why here and not a crate: the Rust NBD crates are incomplete (no structured replies or block
//! status), and serving qcow2 well needs the engine's block status for sparse reads and maps.
//!
//! Layout (each file has one job):
//! - [`proto`]: the wire format, constants and pure encoders/decoders (no I/O, unit-tested on
//!   malformed input);
//! - [`handshake`]: fixed newstyle option haggling, with size limits (the caller adds a time
//!   limit);
//! - [`transmission`]: the request loop of one connection: reader, concurrent request tasks,
//!   batched vectored reply writer, bounded memory per connection;
//! - [`commands`]: validation and execution of each request against the image;
//! - [`status`]: the `base:allocation` and `qemu:allocation-depth` metadata contexts;
//! - [`export`]: what is served and what is advertised about it;
//! - [`server`]: listener, connection limit, graceful shutdown;
//! - [`client`]: the client side of the handshake, to list another server's exports;
//! - [`remote`]: an export of another server as `Storage` (`nbd://` names in qimg's tools);
//! - [`tls`]: TLS with X.509 credentials, and the handshake before `NBD_OPT_STARTTLS`.
//!
//! Guarantees: no input from a client can crash the server or make it allocate without bound
//! (every length is checked before it is used, in-flight work is capped per connection and the
//! number of connections is capped); a FLUSH reply means every write answered before the FLUSH
//! arrived, on any connection, is durable.

pub mod authz;
pub mod client;
pub mod commands;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod remote;
pub mod server;
pub mod status;
pub mod tls;
pub mod transmission;

#[cfg(test)]
mod tests;

pub use export::{DetectZeroes, DiscardMode, Export, ExportConfig};
pub use server::{Listen, ServeReport, Server, ServerConfig, SocketId};
pub use transmission::Limits;
