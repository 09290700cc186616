//! A TCP proxy on loopback that a test can cut or freeze: a database that goes away, or one that
//! stops answering without closing its connections, for one resource while the others stay up.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow both ways.
    Open,
    /// Connections stay open but nothing flows (a peer that stopped answering).
    Frozen,
    /// Every connection is closed and new ones are closed at once (a peer that is gone).
    Cut,
}

/// Forwards connections to `target` until dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
    /// Where new connections go; a change cuts the connections made before it.
    target: watch::Sender<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (link, watch) = watch::channel(Link::Open);
        let (target, targets) = watch::channel(target);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut targets = targets.clone();
                let to = *targets.borrow_and_update();
                let link = watch.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = forward(client, to, link) => {}
                        _ = targets.changed() => {} // retargeted: this connection is cut
                    }
                });
            }
        });
        Proxy { addr, link, target, task }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// Sends new connections to `target` and cuts the ones open now (a failover behind a
    /// service address: clients reconnect and reach the new server).
    pub fn retarget(&self, target: SocketAddr) {
        self.target.send_replace(target);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.send_replace(Link::Cut);
        self.task.abort();
    }
}

async fn forward(mut client: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    let state = *link.borrow_and_update();
    if state == Link::Cut {
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else { return };
    // Forward each chunk as it comes: Nagle's algorithm here would hold a small write back
    // behind an unacknowledged one, a delay neither end would see without the proxy.
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    if state == Link::Open {
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
            _ = link.wait_for(|l| *l != Link::Open) => {}
        }
    }
    // Frozen: hold both connections open, moving nothing, until cut.
    let _ = link.wait_for(|l| *l == Link::Cut).await;
}

/// The test PostgreSQL server's address (to put a proxy in front of it): the host and port of
/// [`crate::pg_url`], the scripts' server or the container alike.
pub fn pg_addr() -> SocketAddr {
    let url = crate::pg_url('a');
    let host_port = url.split_once('@').and_then(|(_, rest)| rest.split_once('/')).map(|(hp, _)| hp);
    host_port
        .and_then(|hp| hp.parse().ok())
        .unwrap_or_else(|| panic!("the test PostgreSQL's URL {url} is not postgres://user@<ip>:<port>/<database>"))
}

/// `url` with its host and port replaced by `addr` (to reach the database through a proxy).
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("postgres://user@host:port/db");
    let (_, db) = rest.split_once('/').expect("a database in the url");
    format!("{scheme_user}@{addr}/{db}")
}
