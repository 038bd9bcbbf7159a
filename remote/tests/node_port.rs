//! A node serving on several threads shares one listening socket among
//! them, so no other process (or node) can bind its port and take a share
//! of its connections, as `SO_REUSEPORT` allowed.

use sessio_net::{Secret, on_test_backend};
use sessio_remote::node::{LocalNode, NodeConfig};

#[test]
fn a_second_node_cannot_bind_the_port_of_a_multi_threaded_one() {
    let secret = Secret::from_bytes([5; 32]);
    let mut first = NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1);
    first.threads = 2;
    let node =
        on_test_backend!(B => LocalNode::start::<B>(first, secret.clone()).expect("node serves"));
    // Same port, another id, also on two threads: refused once the bind
    // retry gives up (a restarted node waits for its old socket a moment).
    let mut second = NodeConfig::new(node.addr, 2);
    second.threads = 2;
    match on_test_backend!(B => LocalNode::start::<B>(second, secret)) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}"),
        Ok(n) => panic!("a second node bound {} beside the first", n.addr),
    }
}

/// A cap smaller than the threads is refused, not rounded up; a failed bind
/// names the address.
#[test]
fn bad_caps_and_failed_binds_are_clear_errors() {
    let secret = Secret::from_bytes([5; 32]);
    for (cap, threads) in [(0, 1), (3, 4)] {
        let mut c = NodeConfig::new("127.0.0.1:0".parse().unwrap(), 1);
        c.connections_max = cap;
        c.threads = threads;
        match on_test_backend!(B => LocalNode::start::<B>(c, secret.clone())) {
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
                assert!(e.to_string().contains("connections_max"), "{e}");
            }
            Ok(n) => panic!(
                "a node with cap {cap} on {threads} threads serves at {}",
                n.addr
            ),
        }
    }
    // An address no interface here has (TEST-NET-1).
    let c = NodeConfig::new("192.0.2.1:7700".parse().unwrap(), 1);
    match on_test_backend!(B => LocalNode::start::<B>(c, secret)) {
        Err(e) => assert!(e.to_string().contains("bind 192.0.2.1:7700"), "{e}"),
        Ok(n) => panic!("bound {}", n.addr),
    }
}
