//! The `keel` binary: everything is in the library ([`keel::main`]).

/// mimalloc instead of glibc's malloc: the request path allocates per message (decode, proposal,
/// apply, response), and glibc's arena locking and consolidation cost ~15% of a put's CPU.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keel::main()
}
