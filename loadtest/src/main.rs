//! gavel-loadtest: the load generator. Its scenarios arrive with the load-test work;
//! for now it only states that.

fn main() {
    eprintln!("gavel-loadtest: no scenarios yet");
    std::process::exit(2);
}
