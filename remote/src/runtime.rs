//! The I/O engines as runnable runtimes: [`Rt`] is [`sessio_net::Backend`],
//! which builds and runs its own single-threaded runtime (`runtime`, `run`,
//! `block_on`, `available`). The name stays for the code written against
//! it.

pub use sessio_net::Backend as Rt;
