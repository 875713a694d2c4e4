//! Everything the black-box tests share, in one place:
//!
//! - [`app`]: the real server on port 0 ([`TestApp`]), clients for it, and
//!   request builders.
//! - [`db`]: a fresh database per test on either store ([`TestDb`]), and the
//!   few direct reads and writes the tests make, each written once for both.
//! - [`binary`]: the real `oncely` binary as a child process.
//! - [`proxy`]: TCP proxies that cut a connection to PostgreSQL or a
//!   response on its way to the client.
//! - [`codec`]: a pass-through codec for hand-encoded requests.
//! - [`scrape`]: reading a binary's Prometheus metrics.
//! - [`wait`]: health checks and polling until something holds.

mod app;
mod binary;
mod codec;
mod db;
mod db_proxy;
mod proxy;
mod scrape;
mod wait;

pub(crate) use app::*;
pub(crate) use binary::*;
pub(crate) use codec::*;
pub(crate) use db::*;
pub(crate) use proxy::*;
pub(crate) use scrape::*;
pub(crate) use wait::*;
