//! The example shop as one host of worker processes; see `sessio_web::shop`.

use clap::Parser;

fn main() {
    let args = sessio_web::shop::Args::parse();
    if let Err(e) = sessio_web::shop::run(&args, &[]) {
        eprintln!("shop: {e}");
        std::process::exit(1);
    }
}
