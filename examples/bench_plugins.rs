//! Prints the plugin benchmark table (wasm vs native loss, sampler step
//! overhead). Build the plugins first: `plugins/build.sh`, then
//! `cargo run --release --example bench_plugins`.
//! (Will become `loraplex bench plugins`.)

fn main() {
    print!("{}", loraplex::plugins::bench::run());
}
