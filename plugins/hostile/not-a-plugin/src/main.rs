//! A command component (it exports `wasi:cli/run`, not a loraplex world): the
//! host must refuse to load it as a plugin.
fn main() {
    println!("hello from a component that is not a plugin");
}
