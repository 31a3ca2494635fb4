//! Rebuild the crate whenever a Lua script is added, removed or edited:
//! `include_dir!` on stable Rust does not track new files by itself.
fn main() {
    println!("cargo:rerun-if-changed=lua");
}
