//! The admin server (issue 10) over its UNIX socket and over TCP: every route's happy path,
//! and every kind of bad input answered with a clear 4xx that changes nothing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crossbeam_channel::bounded;
use omniq::admin::{AdminServer, Client, Endpoint, Response};
use omniq::testing;
use omniq::{EnqueueOptions, ListFilter, Queue, Status, TaskContext, TaskError, TaskId, TaskInfo};
use serde_json::{json, Value};

const LONG: Duration = Duration::from_secs(30);

struct Fixture {
    _dir: tempfile::TempDir,
    q: Queue,
    done: TaskId,
    failed: TaskId,
    later: TaskId,
    xss: TaskId,
}

/// A queue with one completed, one failed (two errors), one scheduled task on queue `mail`,
/// and a failed task whose kind, payload and error message are HTML.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::builder(dir.path().join("q"))
        .retry_policy(omniq::RetryPolicy {
            max_retries: 1,
            backoff: omniq::Backoff::new(Duration::ZERO, Duration::ZERO, 0.0),
        })
        .open()
        .unwrap();
    q.register_fn("echo", |v: Value, _c: &TaskContext| Ok(v));
    q.register_fn("flaky", |_v: Value, c: &TaskContext| {
        Err(TaskError::transient(
            "network",
            format!("connection reset on attempt {}", c.attempt()),
        ))
    });
    q.register_fn("<b>kind</b>", |_v: Value, _c: &TaskContext| {
        Err(TaskError::permanent(
            "<i>type</i>",
            "<script>alert('error')</script>",
        ))
    });
    let done = q
        .enqueue_json("echo", &json!({"n": 1}), EnqueueOptions::new())
        .unwrap();
    let failed = q
        .enqueue_json("flaky", &json!({"n": 2}), EnqueueOptions::new())
        .unwrap();
    let xss = q
        .enqueue_json(
            "<b>kind</b>",
            &json!("<script>alert(1)</script>"),
            EnqueueOptions::new(),
        )
        .unwrap();
    for _ in 0..3 {
        testing::run_due(&q).unwrap();
    }
    let later = q
        .enqueue_json(
            "echo",
            &json!({"n": 3}),
            EnqueueOptions::new()
                .queue("mail")
                .delay(Duration::from_secs(3600)),
        )
        .unwrap();
    assert_eq!(q.get(failed).unwrap().unwrap().status, Status::Failed);
    assert_eq!(q.get(done).unwrap().unwrap().status, Status::Completed);
    Fixture {
        _dir: dir,
        q,
        done,
        failed,
        later,
        xss,
    }
}

fn serve(q: &Queue) -> AdminServer {
    q.admin()
        .tcp("127.0.0.1:0".parse().unwrap())
        .serve()
        .unwrap()
}

fn clients(s: &AdminServer) -> Vec<Client> {
    assert_eq!(s.endpoints().len(), 2);
    assert!(matches!(s.endpoints()[0], Endpoint::Unix(_)));
    assert!(matches!(s.endpoints()[1], Endpoint::Tcp(_)));
    s.endpoints().iter().cloned().map(Client::new).collect()
}

fn get(c: &Client, target: &str) -> Response {
    c.request("GET", target, &[], b"").unwrap()
}

fn csrf(c: &Client) -> String {
    get(c, "/api/v1/csrf").json().unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn post(c: &Client, target: &str, body: &str) -> Response {
    let t = csrf(c);
    c.request("POST", target, &[("X-CSRF-Token", &t)], body.as_bytes())
        .unwrap()
}

fn ok_json(r: Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json().unwrap()
}

/// Everything stored, to compare before and after a refused request.
fn snapshot(q: &Queue) -> (omniq::Stats, Vec<TaskInfo>, Vec<String>) {
    let page = q.list(&ListFilter::new().limit(1000)).unwrap();
    (q.stats().unwrap(), page.tasks, q.paused_queues())
}

#[test]
fn every_read_route_answers_over_the_unix_socket_and_tcp() {
    let f = fixture();
    let server = serve(&f.q);
    for c in clients(&server) {
        let h = ok_json(get(&c, "/api/v1/health"));
        assert_eq!(h["status"], "ok");
        assert_eq!(h["read_only"], false);

        let s = ok_json(get(&c, "/api/v1/stats"));
        let stats = f.q.stats().unwrap();
        assert_eq!(s["total"], stats.total);
        assert_eq!(s["by_status"]["FAILED"], 2);
        assert_eq!(s["by_queue"]["mail"]["PENDING"], 1);
        assert_eq!(
            c.stats().unwrap(),
            stats,
            "the typed client agrees with the library"
        );

        let qs = ok_json(get(&c, "/api/v1/queues"));
        let names: Vec<&str> = qs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["default", "mail"]);

        // Filters and cursor, as Queue::list.
        let l = ok_json(get(&c, "/api/v1/tasks?status=failed"));
        let ids: Vec<&str> = l["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&f.failed.to_string().as_str()));
        let l = ok_json(get(&c, "/api/v1/tasks?queue=mail&kind=echo"));
        assert_eq!(l["tasks"][0]["id"], f.later.to_string());
        let mut seen = Vec::new();
        let mut cursor = String::new();
        loop {
            let l = ok_json(get(&c, &format!("/api/v1/tasks?limit=1&cursor={cursor}")));
            for t in l["tasks"].as_array().unwrap() {
                seen.push(t["id"].as_str().unwrap().to_string());
            }
            match l["next_cursor"].as_str() {
                Some(n) => cursor = n.to_string(),
                None => break,
            }
        }
        let lib: Vec<String> =
            f.q.list(&ListFilter::new())
                .unwrap()
                .tasks
                .iter()
                .map(|t| t.id.to_string())
                .collect();
        assert_eq!(
            seen, lib,
            "paging with the cursor sees every task once, in order"
        );
        let l = ok_json(get(&c, "/api/v1/tasks?q=connection%20reset"));
        assert_eq!(l["tasks"].as_array().unwrap().len(), 1, "text search");

        // Detail: errors and transition history.
        let d = ok_json(get(&c, &format!("/api/v1/tasks/{}", f.failed)));
        assert_eq!(d["status"], "FAILED");
        assert_eq!(d["errors"].as_array().unwrap().len(), 2);
        assert_eq!(d["errors"][1]["message"], "connection reset on attempt 2");
        assert_eq!(d["last_error"]["error_type"], "network");
        let causes: Vec<&str> = d["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["cause"].as_str().unwrap())
            .collect();
        assert_eq!(
            causes,
            [
                "enqueued",
                "claimed",
                "failed (network)",
                "claimed",
                "failed (network)"
            ]
        );
        assert_eq!(c.get(f.failed).unwrap(), f.q.get(f.failed).unwrap());
        assert_eq!(c.history(f.failed).unwrap(), f.q.history(f.failed).unwrap());
        assert_eq!(c.get(f.done).unwrap(), f.q.get(f.done).unwrap());

        let chk = ok_json(get(&c, "/api/v1/check"));
        assert_eq!(chk["consistent"], true);
        let act = ok_json(get(&c, "/api/v1/activity"));
        assert_eq!(act["minutes"].as_array().unwrap().len(), 60);

        let m = get(&c, "/metrics");
        assert_eq!(m.status, 200);
        let text = m.text();
        assert!(
            text.contains("omniq_tasks{queue=\"default\",state=\"failed\"} 2"),
            "{text}"
        );
        assert!(text.contains("omniq_tasks{queue=\"mail\",state=\"pending\"} 1"));
        assert!(text.contains("# TYPE omniq_fsync_duration_seconds histogram"));
        assert!(text.contains("omniq_commit_group_size_count"));
        assert!(text.contains("omniq_recovery_tasks{outcome=\"recovered\"} 0"));

        for page in [
            "/",
            "/queues",
            "/tasks",
            "/tasks?status=failed&queue=default",
        ] {
            let r = get(&c, page);
            assert_eq!(r.status, 200, "{page}");
            assert!(r.header("content-type").unwrap().starts_with("text/html"));
            assert_eq!(r.header("cache-control"), Some("no-store"));
            assert!(r
                .header("content-security-policy")
                .unwrap()
                .contains("script-src 'self'"));
        }
        let r = get(&c, &format!("/tasks/{}", f.failed));
        assert!(r.text().contains("connection reset on attempt 1"));
        assert_eq!(get(&c, "/assets/app.js").status, 200);
    }
    server.stop();
}

#[test]
fn task_values_are_escaped_in_the_dashboard() {
    let f = fixture();
    let server = f.q.admin().serve().unwrap();
    let c = Client::new(server.endpoints()[0].clone());
    for page in [format!("/tasks/{}", f.xss), "/tasks".to_string()] {
        let html = get(&c, &page).text();
        assert!(!html.contains("<script>alert"), "{page}: {html}");
        assert!(!html.contains("<b>kind</b>"), "{page}");
        assert!(html.contains("&lt;b&gt;kind&lt;/b&gt;"), "{page}");
    }
    let html = get(&c, &format!("/tasks/{}", f.xss)).text();
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("&lt;script&gt;alert(&#39;error&#39;)&lt;/script&gt;"));
    let html = get(&c, "/tasks?q=%3Cscript%3E").text();
    assert!(
        !html.contains("value=\"<script>"),
        "the search box echoes escaped text"
    );
}

#[test]
fn actions_work_and_dry_runs_change_nothing() {
    let f = fixture();
    let server = serve(&f.q);
    let cs = clients(&server);
    let (unix, tcp) = (&cs[0], &cs[1]);

    // Pause / resume.
    let r = ok_json(post(unix, "/api/v1/queues/mail/pause", ""));
    assert_eq!(r["paused"], true);
    assert!(f.q.is_paused("mail"));
    let qs = ok_json(get(tcp, "/api/v1/queues"));
    assert_eq!(qs["queues"][1]["paused"], true);
    ok_json(post(tcp, "/api/v1/queues/mail/resume", ""));
    assert!(!f.q.is_paused("mail"));

    // Dry runs change nothing.
    let before = snapshot(&f.q);
    let r = ok_json(post(
        unix,
        "/api/v1/tasks/retry",
        r#"{"filter": {"status": "failed", "queue": "default"}, "dry_run": true}"#,
    ));
    assert_eq!(r["matched"], 2);
    let r = ok_json(post(
        tcp,
        &format!("/api/v1/tasks/{}/retry", f.failed),
        r#"{"dry_run": true}"#,
    ));
    assert_eq!(r["task"]["status"], "FAILED");
    let r = ok_json(post(
        unix,
        "/api/v1/purge",
        r#"{"older_than": "0s", "dry_run": true}"#,
    ));
    assert_eq!(r["matched"], 3);
    let r = ok_json(post(
        unix,
        "/api/v1/tasks/cancel",
        r#"{"ids": [], "dry_run": true}"#,
    ));
    assert_eq!(r["matched"], 0);
    assert_eq!(snapshot(&f.q), before);

    // One retry, then the bulk retry of what is left.
    let r = ok_json(post(tcp, &format!("/api/v1/tasks/{}/retry", f.failed), ""));
    assert_eq!(r["status"], "PENDING");
    assert_eq!(f.q.get(f.failed).unwrap().unwrap().status, Status::Pending);
    let r = ok_json(post(
        unix,
        "/api/v1/tasks/retry",
        r#"{"filter": {"status": "failed"}}"#,
    ));
    assert_eq!(
        (r["matched"].as_u64(), r["changed"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(f.q.get(f.xss).unwrap().unwrap().status, Status::Pending);

    // Bulk cancel by ids, single cancel.
    let body = json!({"ids": [f.xss.to_string()]}).to_string();
    let r = ok_json(post(tcp, "/api/v1/tasks/cancel", &body));
    assert_eq!(r["changed"], 1);
    assert_eq!(f.q.get(f.xss).unwrap().unwrap().status, Status::Cancelled);
    let r = ok_json(post(unix, &format!("/api/v1/tasks/{}/cancel", f.later), ""));
    assert_eq!(r["status"], "CANCELLED");

    // Purge.
    let r = ok_json(post(unix, "/api/v1/purge", r#"{"older_than": "0s"}"#));
    assert_eq!(r["tasks_removed"], 3);
    assert!(f.q.get(f.done).unwrap().is_none());
    assert!(f.q.check_consistency().unwrap().is_consistent());
}

/// method, target, headers, body, expected status, expected error code.
type Case<'a> = (
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    Vec<u8>,
    u16,
    &'a str,
);

#[test]
fn bad_requests_get_a_clear_4xx_and_change_nothing() {
    let f = fixture();
    let server = serve(&f.q);
    let unknown = "0192f5e4-8c1a-7b3e-9f00-1a2b3c4d5e6f";
    for c in clients(&server) {
        let before = snapshot(&f.q);
        let token = csrf(&c);
        let big = vec![b'x'; 70 * 1024];
        let long_url = format!("/api/v1/tasks?q={}", "a".repeat(5000));
        let long_name = format!("/api/v1/queues/{}/pause", "q".repeat(200));
        let cases: Vec<Case> = vec![
            (
                "GET",
                format!("/api/v1/tasks/{unknown}"),
                vec![],
                vec![],
                404,
                "not_found",
            ),
            (
                "GET",
                "/api/v1/tasks/nope".into(),
                vec![],
                vec![],
                400,
                "bad_id",
            ),
            (
                "GET",
                "/api/v1/tasks?status=done".into(),
                vec![],
                vec![],
                400,
                "bad_filter",
            ),
            (
                "GET",
                "/api/v1/tasks?colour=red".into(),
                vec![],
                vec![],
                400,
                "bad_filter",
            ),
            (
                "GET",
                "/api/v1/tasks?limit=0".into(),
                vec![],
                vec![],
                400,
                "bad_filter",
            ),
            (
                "GET",
                "/api/v1/tasks?limit=100000".into(),
                vec![],
                vec![],
                400,
                "bad_filter",
            ),
            (
                "GET",
                "/api/v1/tasks?cursor=xyz".into(),
                vec![],
                vec![],
                400,
                "bad_id",
            ),
            (
                "GET",
                "/api/v1/tasks?q=%zz".into(),
                vec![],
                vec![],
                400,
                "bad_query",
            ),
            ("GET", long_url, vec![], vec![], 414, "uri_too_long"),
            (
                "GET",
                "/api/v1/nothing".into(),
                vec![],
                vec![],
                404,
                "no_route",
            ),
            (
                "DELETE",
                "/api/v1/tasks".into(),
                vec![],
                vec![],
                405,
                "method_not_allowed",
            ),
            (
                "POST",
                "/api/v1/stats".into(),
                vec![("X-CSRF-Token", &token)],
                vec![],
                405,
                "method_not_allowed",
            ),
            // Actions: CSRF first.
            (
                "POST",
                format!("/api/v1/tasks/{}/retry", f.failed),
                vec![],
                vec![],
                403,
                "csrf_missing",
            ),
            (
                "POST",
                format!("/api/v1/tasks/{}/retry", f.failed),
                vec![("X-CSRF-Token", "0000")],
                vec![],
                403,
                "csrf_invalid",
            ),
            (
                "POST",
                "/api/v1/queues/mail/pause".into(),
                vec![],
                vec![],
                403,
                "csrf_missing",
            ),
            (
                "POST",
                "/api/v1/tasks/retry".into(),
                vec![("X-CSRF-Token", &token)],
                big,
                413,
                "body_too_large",
            ),
            (
                "POST",
                format!("/api/v1/tasks/{unknown}/retry"),
                vec![("X-CSRF-Token", &token)],
                vec![],
                404,
                "not_found",
            ),
            (
                "POST",
                format!("/api/v1/tasks/{}/retry", f.later),
                vec![("X-CSRF-Token", &token)],
                vec![],
                409,
                "invalid_state",
            ),
            (
                "POST",
                format!("/api/v1/tasks/{}/cancel", f.done),
                vec![("X-CSRF-Token", &token)],
                vec![],
                409,
                "invalid_state",
            ),
            (
                "POST",
                "/api/v1/tasks/retry".into(),
                vec![("X-CSRF-Token", &token)],
                b"{not json".to_vec(),
                400,
                "bad_body",
            ),
            (
                "POST",
                "/api/v1/tasks/retry".into(),
                vec![("X-CSRF-Token", &token)],
                br#"{"filter": {}, "ids": []}"#.to_vec(),
                400,
                "bad_body",
            ),
            (
                "POST",
                "/api/v1/tasks/retry".into(),
                vec![("X-CSRF-Token", &token)],
                br#"{"filter": {"colour": "red"}}"#.to_vec(),
                400,
                "bad_body",
            ),
            (
                "POST",
                "/api/v1/tasks/retry".into(),
                vec![("X-CSRF-Token", &token)],
                br#"{"filter": {"status": "pending"}}"#.to_vec(),
                400,
                "bad_filter",
            ),
            (
                "POST",
                "/api/v1/tasks/cancel".into(),
                vec![("X-CSRF-Token", &token)],
                format!(r#"{{"ids": ["{}", "{unknown}"]}}"#, f.later).into_bytes(),
                404,
                "not_found",
            ),
            (
                "POST",
                "/api/v1/purge".into(),
                vec![("X-CSRF-Token", &token)],
                br#"{"older_than": "soon"}"#.to_vec(),
                400,
                "bad_body",
            ),
            (
                "POST",
                "/api/v1/purge".into(),
                vec![("X-CSRF-Token", &token)],
                b"{}".to_vec(),
                400,
                "bad_body",
            ),
            (
                "POST",
                long_name,
                vec![("X-CSRF-Token", &token)],
                vec![],
                400,
                "bad_request",
            ),
        ];
        for (method, target, headers, body, status, code) in cases {
            let r = c.request(method, &target, &headers, &body).unwrap();
            let shown: String = target.chars().take(80).collect();
            assert_eq!(r.status, status, "{method} {shown}: {}", r.text());
            let v = r
                .json()
                .unwrap_or_else(|e| panic!("{method} {shown}: not JSON: {e}"));
            assert_eq!(v["error"]["code"], code, "{method} {shown}: {v}");
            assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        }
        assert_eq!(
            snapshot(&f.q),
            before,
            "no refused request changed anything"
        );
    }
}

#[test]
fn tcp_needs_a_token_off_loopback_and_checks_it() {
    let f = fixture();
    let err =
        f.q.admin()
            .no_unix_socket()
            .tcp("0.0.0.0:0".parse().unwrap())
            .serve()
            .err()
            .expect("a non-loopback address without a token is refused");
    assert!(err.to_string().contains("requires a bearer token"), "{err}");
    assert!(
        f.q.admin().no_unix_socket().serve().is_err(),
        "nothing to listen on"
    );

    let token = "s3cret-token-for-tests-0123456789";
    let s =
        f.q.admin()
            .no_unix_socket()
            .tcp("127.0.0.1:0".parse().unwrap())
            .token(token)
            .serve()
            .unwrap();
    let ep = s.endpoints()[0].clone();
    let anon = Client::new(ep.clone());
    let r = get(&anon, "/api/v1/stats");
    assert_eq!(r.status, 401);
    assert_eq!(r.json().unwrap()["error"]["code"], "unauthorized");
    let wrong = Client::new(ep.clone()).token("s3cret-token-for-tests-WRONG012345");
    assert_eq!(get(&wrong, "/api/v1/stats").status, 401);
    let right = Client::new(ep.clone()).token(token);
    assert_eq!(right.stats().unwrap(), f.q.stats().unwrap());
    // An action with a valid CSRF token but a wrong (or no) bearer token changes nothing.
    let before = snapshot(&f.q);
    let csrf = csrf(&right);
    let target = format!("/api/v1/tasks/{}/retry", f.failed);
    for c in [&wrong, &anon] {
        let r = c
            .request("POST", &target, &[("X-CSRF-Token", &csrf)], b"{}")
            .unwrap();
        assert_eq!(r.status, 401, "{}", r.text());
    }
    assert_eq!(snapshot(&f.q), before);
    // Browsers log in once; the cookie then works.
    let r = get(&anon, &format!("/login?token={token}"));
    assert_eq!(r.status, 303);
    let cookie = r.header("set-cookie").unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let pair = cookie.split(';').next().unwrap();
    let r = anon.request("GET", "/", &[("Cookie", pair)], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(get(&anon, "/login?token=nope").status, 401);
    s.stop();

    // Without a token, a non-loopback Host header (DNS rebinding) is refused.
    let s =
        f.q.admin()
            .no_unix_socket()
            .tcp("127.0.0.1:0".parse().unwrap())
            .serve()
            .unwrap();
    let c = Client::new(s.endpoints()[0].clone());
    let r = c
        .request("GET", "/api/v1/csrf", &[("Host", "evil.example:80")], b"")
        .unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.json().unwrap()["error"]["code"], "bad_host");
}

#[test]
fn read_only_mode_refuses_every_action_and_shows_no_buttons() {
    let f = fixture();
    let s = f.q.admin().read_only(true).serve().unwrap();
    let c = Client::new(s.endpoints()[0].clone());
    let before = snapshot(&f.q);
    let r = post(&c, &format!("/api/v1/tasks/{}/retry", f.failed), "");
    assert_eq!(r.status, 403);
    assert_eq!(r.json().unwrap()["error"]["code"], "read_only");
    assert_eq!(post(&c, "/api/v1/queues/default/pause", "").status, 403);
    assert_eq!(snapshot(&f.q), before);
    let html = get(&c, &format!("/tasks/{}", f.failed)).text();
    assert!(html.contains("read-only"));
    assert!(!html.contains("data-url"), "no action buttons");
    assert_eq!(ok_json(get(&c, "/api/v1/health"))["read_only"], true);
}

#[test]
fn the_socket_is_private_and_goes_away_at_stop() {
    let f = fixture();
    let s = f.q.admin().serve().unwrap();
    let path = s.unix_socket_path().unwrap().to_path_buf();
    assert_eq!(path, omniq::admin::default_socket_path(f.q.path()));
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700);
    // A second server on the same socket is refused.
    assert!(f.q.admin().serve().is_err());
    s.stop();
    assert!(!path.exists());
    // A stale socket file (a dead process's) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let s = f.q.admin().serve().unwrap();
    assert_eq!(
        Client::new(s.endpoints()[0].clone()).stats().unwrap().total,
        4
    );
}

#[test]
fn cancelling_a_running_task_through_the_api_and_live_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path()).unwrap();
    let (started_tx, started) = bounded::<()>(1);
    q.register_fn("long", move |_v: Value, ctx: &TaskContext| {
        started_tx.send(()).ok();
        let until = std::time::Instant::now() + LONG;
        while !ctx.is_cancelled() && std::time::Instant::now() < until {
            std::thread::yield_now();
        }
        Ok(json!(null))
    });
    q.register_fn("bad", |_v: Value, _c: &TaskContext| {
        Err(TaskError::permanent("quota", "over quota"))
    });
    let s = q.admin().serve().unwrap();
    let c = Client::new(s.endpoints()[0].clone());
    let pool = q.workers().concurrency(2).start().unwrap();
    let bad = q
        .enqueue_json("bad", &json!(1), EnqueueOptions::new())
        .unwrap();
    assert_eq!(q.wait(bad, LONG).unwrap().status, Status::Failed);
    let id = q
        .enqueue_json("long", &json!(null), EnqueueOptions::new())
        .unwrap();
    started.recv_timeout(LONG).unwrap();
    let r = ok_json(post(&c, &format!("/api/v1/tasks/{id}/cancel"), ""));
    assert_eq!(
        r["status"], "RUNNING",
        "cooperative: still running when the call returns"
    );
    assert_eq!(q.wait(id, LONG).unwrap().status, Status::Cancelled);
    pool.stop();

    // The metrics thread sees transitions asynchronously: wait for its view to catch up.
    let deadline = std::time::Instant::now() + LONG;
    let text = loop {
        let text = get(&c, "/metrics").text();
        if text.contains("omniq_transitions_total{cause=\"cancelled\",to=\"cancelled\"} 1")
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::yield_now();
    };
    for needle in [
        "omniq_transitions_total{cause=\"cancelled\",to=\"cancelled\"} 1",
        "omniq_transitions_total{cause=\"failed\",to=\"failed\"} 1",
        "omniq_executions_total{kind=\"long\"} 1",
        "omniq_execution_failures_total{kind=\"bad\",error_type=\"quota\"} 1",
        "omniq_execution_duration_seconds_count{queue=\"default\"} 2",
        "omniq_enqueue_to_start_seconds_count{queue=\"default\"} 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
}

#[test]
fn the_server_does_not_keep_the_queue_open() {
    let f = fixture();
    let s = f.q.admin().serve().unwrap();
    let c = Client::new(s.endpoints()[0].clone());
    assert_eq!(c.stats().unwrap().total, 4);
    let path = f.q.path().to_path_buf();
    f.q.close().expect("closes while the admin server runs");
    let r = get(&c, "/api/v1/stats");
    assert_eq!(r.status, 503);
    assert_eq!(r.json().unwrap()["error"]["code"], "closed");
    // The directory is free again.
    let q = Queue::open(&path).unwrap();
    assert_eq!(q.stats().unwrap().total, 4);
}

#[test]
fn a_stalled_client_blocks_neither_other_requests_nor_stop() {
    use std::io::Write;
    let f = fixture();
    let s = f.q.admin().serve().unwrap();
    let path = s.unix_socket_path().unwrap().to_path_buf();
    // Promises a 60,000-byte body (under the limit, so it is read) and sends one byte.
    let mut stalled = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stalled
        .write_all(
            b"POST /api/v1/purge HTTP/1.1\r\nHost: localhost\r\nContent-Length: 60000\r\n\r\n{",
        )
        .unwrap();
    let c = Client::new(s.endpoints()[0].clone());
    assert_eq!(c.stats().unwrap().total, 4, "another thread still answers");
    let t0 = std::time::Instant::now();
    s.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "stop gave up on the stalled request after its grace period: {:?}",
        t0.elapsed()
    );
    assert!(!path.exists());
    drop(stalled);
}
