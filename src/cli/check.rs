//! `qimg check` (placeholder until the check engine lands).
#[derive(clap::Args)]
pub struct Args {
    filename: String,
}
pub async fn run(a: Args) -> u8 {
    super::fail(format!("{}: check is not implemented yet", a.filename))
}
