//! The test harness's replicated store: a commit on the primary is on the synchronous standby,
//! and survives the primary's kill -9 and the standby's promotion.

use pledge_integration_tests::store::StorePair;
use sqlx::PgPool;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_on_the_synchronous_standby_and_survives_failover() {
    let pair = StorePair::start().await;
    let pool = PgPool::connect(&pair.url()).await.unwrap();
    sqlx::query("CREATE TABLE t (id int PRIMARY KEY)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await.unwrap();
    // Synchronous: acknowledged only once the standby has it, so it is visible there.
    let standby = PgPool::connect(&pair.standby_url()).await.unwrap();
    let replayed = async {
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&standby).await.unwrap_or(0);
            if n == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), replayed).await.expect("the row is on the standby");
    pool.close().await;
    pair.kill_primary();
    pair.promote_standby().await;
    let pool = PgPool::connect(&pair.url()).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM t").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 1, "an acknowledged commit was lost in the failover");
    sqlx::query("INSERT INTO t VALUES (2)").execute(&pool).await.expect("the promoted standby takes writes");
}
