//! Generates the agent protocol's Rust code (messages and ttrpc client and server) from
//! `proto/agent.proto` into OUT_DIR with ttrpc-codegen's pure-Rust parser: no `protoc` needed.

fn main() {
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    println!("cargo:rerun-if-changed=proto/agent.proto");
    ttrpc_codegen::Codegen::new()
        .out_dir(&out_dir)
        .include("proto")
        .input("proto/agent.proto")
        .rust_protobuf()
        .customize(ttrpc_codegen::Customize::default())
        .rust_protobuf_customize(ttrpc_codegen::ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating the agent protocol from proto/agent.proto");
    // The generated files carry inner attributes, which `include!` cannot take inside a module
    // block: declare them as modules of a file that lib.rs includes (they resolve beside it).
    std::fs::write(
        std::path::Path::new(&out_dir).join("mod.rs"),
        "pub mod agent;\npub mod agent_ttrpc;\n",
    )
    .expect("writing OUT_DIR/mod.rs");
}
