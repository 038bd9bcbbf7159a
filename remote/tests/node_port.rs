//! A node serving on several threads shares one listening socket among
//! them, so no other process (or node) can bind its port and take a share
//! of its connections, as `SO_REUSEPORT` allowed.

use sessio_net::{IoUring, Secret};
use sessio_remote::node::{LocalNode, NodeConfig};
use sessio_remote::runtime::Rt;

#[test]
fn a_second_node_cannot_bind_the_port_of_a_multi_threaded_one() {
    assert!(IoUring::available(), "io_uring is required here");
    let secret = Secret::from_bytes([5; 32]);
    let mut first = NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1);
    first.threads = 2;
    let node = LocalNode::start::<IoUring>(first, secret.clone()).expect("node serves");
    // Same port, another id, also on two threads: refused once the bind
    // retry gives up (a restarted node waits for its old socket a moment).
    let mut second = NodeConfig::new(node.addr, 2);
    second.threads = 2;
    match LocalNode::start::<IoUring>(second, secret) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}"),
        Ok(n) => panic!("a second node bound {} beside the first", n.addr),
    }
}
