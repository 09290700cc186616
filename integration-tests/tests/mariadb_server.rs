//! The test MariaDB server itself (integration-tests/scripts/mariadb.sh), before any adapter:
//! a prepared XA transaction survives kill -9 of `mariadbd` and a restart with
//! `PLEDGE_MARIADB_START`, is listed by `XA RECOVER` for the tests' account, and commits.
//! If this fails, the server's settings (binlog, sync, server_id) are wrong, not Pledge.

use pledge_integration_tests::mariadb::{kill9_server, mariadb_ping, mariadb_sql, restart_server};

#[tokio::test]
async fn prepared_xa_survives_kill9_of_the_server() {
    mariadb_ping('a').expect("the tests' account connects");
    let table = format!("xa_survives_{:08x}", fastrand::u32(..));
    let gtrid = format!("pledge-it-{table}");
    mariadb_sql('a', &format!("CREATE TABLE {table} (id INT PRIMARY KEY) ENGINE=InnoDB"));
    // One session from XA START to XA PREPARE; the session ends after the prepare.
    mariadb_sql(
        'a',
        &format!("XA START '{gtrid}'; INSERT INTO {table} VALUES (1); XA END '{gtrid}'; XA PREPARE '{gtrid}'"),
    );
    let recover = || mariadb_sql('b', "XA RECOVER FORMAT='SQL'");
    assert!(recover().contains(&format!("'{gtrid}'")), "prepared before the kill");

    kill9_server().await;
    restart_server().await;

    let listed = recover();
    assert!(listed.contains(&format!("'{gtrid}'")), "XA RECOVER after kill -9 and restart: {listed:?}");
    assert_eq!(mariadb_sql('a', &format!("SELECT COUNT(*) FROM {table}")).trim(), "0", "not yet committed");
    mariadb_sql('a', &format!("XA COMMIT '{gtrid}'"));
    assert_eq!(mariadb_sql('a', &format!("SELECT id FROM {table}")).trim(), "1");
    assert!(!recover().contains(&format!("'{gtrid}'")), "gone from XA RECOVER once committed");
    mariadb_sql('a', &format!("DROP TABLE {table}"));
}
