//! `qimg io` (placeholder).
#[derive(clap::Args)]
pub struct Args {
    filename: String,
}
pub async fn run(a: Args) -> u8 {
    super::fail(format!("{}: io is not implemented yet", a.filename))
}
