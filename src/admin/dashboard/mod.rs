//! The web dashboard: server-rendered HTML (every value from a task is escaped), one stylesheet
//! and one small script embedded in the binary. Actions are `fetch` POSTs to the JSON API with
//! the CSRF token from the page's `<meta>`, after a confirmation.

use std::fmt::Write as _;

use serde_json::Value;

use super::api;
use super::server::{App, Method, Req, Resp};
use crate::inspect::ListFilter;
use crate::task::{Status, TaskId, TaskInfo};

const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

pub(crate) fn handle(app: &App<'_>, req: &Req) -> Resp {
    if req.method != Method::Get {
        return Resp::error(405, "method_not_allowed", "the dashboard only serves GET");
    }
    match req.path.as_str() {
        "/" => overview(app),
        "/queues" => queues(app),
        "/tasks" => tasks(app, req),
        "/assets/app.css" => Resp::text(200, "text/css; charset=utf-8", CSS),
        "/assets/app.js" => Resp::text(200, "text/javascript; charset=utf-8", JS),
        // Browsers ask for it on every page; there is none.
        "/favicon.ico" => Resp::text(204, "image/x-icon", Vec::new()),
        p => match p.strip_prefix("/tasks/") {
            Some(id) => task(app, id),
            None => page(
                app,
                404,
                "Not found",
                "",
                &format!("<p>No page at <code>{}</code>.</p>", esc(p)),
                None,
            ),
        },
    }
}

/// Escapes text for HTML element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a value for a URL query or path segment.
fn url(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn page(
    app: &App<'_>,
    status: u16,
    title: &str,
    nav: &str,
    body: &str,
    refresh: Option<u32>,
) -> Resp {
    let link = |href: &str, name: &str| {
        let cls = if nav == name { " class=\"on\"" } else { "" };
        format!("<a href=\"{href}\"{cls}>{name}</a>")
    };
    let mode = if app.read_only {
        "<span class=\"badge\">read-only</span>"
    } else {
        ""
    };
    let refresh = refresh
        .map(|ms| format!(" data-refresh=\"{ms}\""))
        .unwrap_or_default();
    Resp::html(
        status,
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<meta name=\"csrf-token\" content=\"{csrf}\">\
<title>{title} · omniq</title><link rel=\"stylesheet\" href=\"/assets/app.css\">\
<script src=\"/assets/app.js\" defer></script></head>\
<body{refresh}><header><strong>omniq</strong> <span class=\"dir\">{dir}</span> {mode}<nav>{o} {q} {t}</nav></header>\
<div id=\"flash\" role=\"status\"></div><main><h1>{title}</h1>{body}</main></body></html>\n",
            csrf = if app.read_only { "" } else { app.csrf },
            title = esc(title),
            dir = esc(&app.queue.path().display().to_string()),
            o = link("/", "Overview"),
            q = link("/queues", "Queues"),
            t = link("/tasks", "Tasks"),
        ),
    )
}

fn error_page(app: &App<'_>, e: &crate::Error) -> Resp {
    let r = Resp::from_error(e);
    page(
        app,
        r.status,
        "Error",
        "",
        &format!("<p class=\"err\">{}</p>", esc(&e.to_string())),
        None,
    )
}

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Pending => "pending",
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

fn pill(s: Status) -> String {
    format!(
        "<span class=\"pill {}\">{}</span>",
        status_class(s),
        s.as_str()
    )
}

/// An action button: the script confirms, then POSTs `body` to `url`.
fn button(app: &App<'_>, label: &str, url_: &str, body: &str, confirm: &str, cls: &str) -> String {
    if app.read_only {
        return String::new();
    }
    format!(
        "<button type=\"button\" class=\"{cls}\" data-url=\"{}\" data-body=\"{}\" data-confirm=\"{}\">{}</button>",
        esc(url_),
        esc(body),
        esc(confirm),
        esc(label)
    )
}

fn overview(app: &App<'_>) -> Resp {
    let stats = match app.queue.stats() {
        Ok(s) => s,
        Err(e) => return error_page(app, &e),
    };
    let act = app.metrics.activity_json(app.queue.now());
    let mut b = String::new();
    b.push_str("<section class=\"cards\">");
    for s in Status::ALL {
        let _ = write!(
            b,
            "<a class=\"card {}\" href=\"/tasks?status={}\"><span>{}</span><b data-count=\"{}\">{}</b></a>",
            status_class(s),
            status_class(s),
            s.as_str(),
            status_class(s),
            stats.count(s)
        );
    }
    b.push_str("</section>");
    let f = |k: &str| act[k].as_f64().unwrap_or(0.0);
    let _ = write!(
        b,
        "<h2>Last hour</h2><section class=\"cards\">\
<div class=\"card\"><span>completed / min</span><b>{:.2}</b></div>\
<div class=\"card\"><span>failed executions</span><b>{:.1} %</b></div>\
<div class=\"card\"><span>mean enqueue-to-start</span><b>{:.1} ms</b></div>\
<div class=\"card\"><span>started</span><b>{}</b></div></section>",
        f("throughput_per_minute"),
        f("failure_rate") * 100.0,
        f("mean_enqueue_to_start_ms"),
        act["started"].as_u64().unwrap_or(0),
    );
    b.push_str(&chart(&act));
    b.push_str("<h2>Queues</h2>");
    b.push_str(&queue_table(app, &stats, false));
    b.push_str(&limits_and_schedules(app));
    if !app.read_only {
        let _ = write!(
            b,
            "<h2>Maintenance</h2><p class=\"purge\"><label>Purge finished tasks (and their history) older than \
<input id=\"purge-age\" value=\"7d\" maxlength=\"32\" size=\"6\"></label> {}</p>",
            button(
                app,
                "Purge",
                "/api/v1/purge",
                "{}",
                "Delete every finished task older than the age given, with its history? This cannot be undone.",
                "danger purge",
            )
            .replace("<button ", "<button data-age-from=\"purge-age\" ")
        );
    }
    // The overview refreshes itself, except while an operator types in the purge box.
    page(app, 200, "Overview", "Overview", &b, Some(5000))
}

/// The limits (what runs, what waits) and schedules (last and next tick), when there are any.
fn limits_and_schedules(app: &App<'_>) -> String {
    let mut b = String::new();
    let ts = |t: Option<crate::Timestamp>| t.map_or("-".to_string(), |t| t.to_string());
    if let Ok(limits) = app.queue.limits() {
        if !limits.is_empty() {
            b.push_str(
                "<h2>Limits</h2><table id=\"limits\"><thead><tr><th>On</th><th>Limit</th>\
<th>Running</th><th>Started in window</th><th>Waiting</th><th>Window frees a slot at</th></tr>\
</thead><tbody>",
            );
            for l in &limits {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&l.scope.to_string()),
                    esc(&l.limit.to_string()),
                    l.running,
                    l.started_in_window,
                    l.waiting,
                    ts(l.frees_at)
                );
            }
            b.push_str("</tbody></table>");
        }
    }
    if let Ok(schedules) = app.queue.schedules() {
        if !schedules.is_empty() {
            b.push_str(
                "<h2>Schedules</h2><table id=\"schedules\"><thead><tr><th>Name</th><th>When</th>\
<th>Task</th><th>State</th><th>Last tick</th><th>Next tick</th><th>Fired</th><th>Skipped</th>\
</tr></thead><tbody>",
            );
            for s in &schedules {
                let _ = write!(
                    b,
                    "<tr><td>{}</td><td>{}</td><td>{} on {}</td><td>{}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{}</td></tr>",
                    esc(&s.name),
                    esc(&s.spec.to_string()),
                    esc(&s.kind),
                    esc(&s.options.queue),
                    if s.paused { "paused" } else { "active" },
                    if s.fired + s.skipped == 0 {
                        "-".to_string()
                    } else {
                        s.last_fired.to_string()
                    },
                    ts(s.next_tick()),
                    s.fired,
                    s.skipped
                );
            }
            b.push_str("</tbody></table>");
        }
    }
    b
}

/// Completions (and failures) per minute over the last hour, as an inline SVG bar chart.
fn chart(act: &Value) -> String {
    let empty = Vec::new();
    let minutes = act["minutes"].as_array().unwrap_or(&empty);
    let max = minutes
        .iter()
        .map(|m| m["completed"].as_u64().unwrap_or(0) + m["failures"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, h) = (600.0, 80.0);
    let bw = w / minutes.len().max(1) as f64;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"completions and failures per minute, last hour\">",
        h + 2.0
    );
    for (i, m) in minutes.iter().enumerate() {
        let c = m["completed"].as_u64().unwrap_or(0) as f64;
        let fl = m["failures"].as_u64().unwrap_or(0) as f64;
        let hc = c / max as f64 * h;
        let hf = fl / max as f64 * h;
        let x = i as f64 * bw;
        let _ = write!(
            svg,
            "<rect class=\"ok\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hc:.1}\"><title>{}: {c} completed, {fl} failed</title></rect>",
            h - hc,
            bw * 0.8,
            esc(m["minute"].as_str().unwrap_or(""))
        );
        if hf > 0.0 {
            let _ = write!(
                svg,
                "<rect class=\"bad\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{hf:.1}\"/>",
                h - hc - hf,
                bw * 0.8
            );
        }
    }
    svg.push_str(
        "</svg><p class=\"legend\">completions (and failures, red) per minute, oldest left</p>",
    );
    svg
}

fn queue_table(app: &App<'_>, stats: &crate::Stats, actions: bool) -> String {
    let paused = app.queue.paused_queues();
    let mut names: Vec<&String> = stats.by_queue.keys().collect();
    for p in &paused {
        if !names.contains(&p) {
            names.push(p);
        }
    }
    names.sort();
    let mut t = String::from("<table class=\"queues\"><thead><tr><th>queue</th>");
    for s in Status::ALL {
        let _ = write!(t, "<th class=\"n\">{}</th>", s.as_str());
    }
    t.push_str("<th>state</th>");
    if actions {
        t.push_str("<th>actions</th>");
    }
    t.push_str("</tr></thead><tbody>");
    for q in names {
        let counts = stats.by_queue.get(q);
        let is_paused = paused.contains(q);
        let _ = write!(
            t,
            "<tr data-queue=\"{}\"><td><a href=\"/tasks?queue={}\">{}</a></td>",
            esc(q),
            url(q),
            esc(q)
        );
        for s in Status::ALL {
            let n = counts.and_then(|c| c.get(&s)).copied().unwrap_or(0);
            let _ = write!(
                t,
                "<td class=\"n\"><a href=\"/tasks?queue={}&amp;status={}\">{n}</a></td>",
                url(q),
                status_class(s)
            );
        }
        let _ = write!(
            t,
            "<td>{}</td>",
            if is_paused {
                "<span class=\"pill paused\">paused</span>"
            } else {
                "active"
            }
        );
        if actions {
            let base = format!("/api/v1/queues/{}", url(q));
            let toggle = if is_paused {
                button(
                    app,
                    "Resume",
                    &format!("{base}/resume"),
                    "{}",
                    &format!("Resume queue {q}?"),
                    "",
                )
            } else {
                button(
                    app,
                    "Pause",
                    &format!("{base}/pause"),
                    "{}",
                    &format!("Pause queue {q}? Its tasks wait until it is resumed."),
                    "",
                )
            };
            let failed = counts
                .and_then(|c| c.get(&Status::Failed))
                .copied()
                .unwrap_or(0);
            let retry_all = if failed > 0 {
                let body =
                    serde_json::json!({"filter": {"status": "failed", "queue": q}, "limit": 10000})
                        .to_string();
                button(
                    app,
                    "Retry all failed",
                    "/api/v1/tasks/retry",
                    &body,
                    &format!("Retry all {failed} failed task(s) in queue {q}?"),
                    "",
                )
            } else {
                String::new()
            };
            let _ = write!(t, "<td>{toggle} {retry_all}</td>");
        }
        t.push_str("</tr>");
    }
    t.push_str("</tbody></table>");
    t
}

fn queues(app: &App<'_>) -> Resp {
    match app.queue.stats() {
        Ok(stats) => page(
            app,
            200,
            "Queues",
            "Queues",
            &queue_table(app, &stats, true),
            None,
        ),
        Err(e) => error_page(app, &e),
    }
}

fn tasks(app: &App<'_>, req: &Req) -> Resp {
    let (filter, text) = match api::filter_from_query(req) {
        Ok(f) => f,
        Err(r) => {
            let msg = serde_json::from_slice::<Value>(&r.body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(String::from))
                .unwrap_or_else(|| "bad filter".into());
            return page(
                app,
                r.status,
                "Tasks",
                "Tasks",
                &format!("<p class=\"err\">{}</p>", esc(&msg)),
                None,
            );
        }
    };
    let filter = ListFilter {
        limit: if req.param("limit").is_some() {
            filter.limit
        } else {
            50
        },
        ..filter
    };
    let p = match api::page(&app.queue, &filter, text.as_deref()) {
        Ok(p) => p,
        Err(e) => return error_page(app, &e),
    };
    let stats = app.queue.stats().unwrap_or_default();
    let qs = |status: Option<Status>| {
        let mut parts = Vec::new();
        if let Some(s) = status {
            parts.push(format!("status={}", status_class(s)));
        }
        if let Some(q) = &filter.queue {
            parts.push(format!("queue={}", url(q)));
        }
        if let Some(k) = &filter.kind {
            parts.push(format!("kind={}", url(k)));
        }
        if let Some(t) = &text {
            parts.push(format!("q={}", url(t)));
        }
        format!("/tasks?{}", parts.join("&"))
    };
    let mut b = String::from("<nav class=\"tabs\">");
    let cls = |on: bool| if on { " class=\"on\"" } else { "" };
    let _ = write!(
        b,
        "<a href=\"{}\"{}>All <small>{}</small></a>",
        esc(&qs(None)),
        cls(filter.status.is_none()),
        stats.total
    );
    for s in Status::ALL {
        let n = match &filter.queue {
            Some(q) => stats
                .by_queue
                .get(q)
                .and_then(|c| c.get(&s))
                .copied()
                .unwrap_or(0),
            None => stats.count(s),
        };
        let _ = write!(
            b,
            "<a href=\"{}\"{} data-tab=\"{}\">{} <small>{n}</small></a>",
            esc(&qs(Some(s))),
            cls(filter.status == Some(s)),
            status_class(s),
            s.as_str()
        );
    }
    b.push_str("</nav>");
    let _ = write!(
        b,
        "<form class=\"filters\" method=\"get\" action=\"/tasks\">\
{status}<label>queue <input name=\"queue\" value=\"{q}\" maxlength=\"128\"></label>\
<label>kind <input name=\"kind\" value=\"{k}\" maxlength=\"128\"></label>\
<label>text <input name=\"q\" value=\"{t}\" maxlength=\"256\" placeholder=\"id, payload, error…\"></label>\
<button type=\"submit\">Filter</button></form>",
        status = filter
            .status
            .map(|s| format!("<input type=\"hidden\" name=\"status\" value=\"{}\">", status_class(s)))
            .unwrap_or_default(),
        q = esc(filter.queue.as_deref().unwrap_or("")),
        k = esc(filter.kind.as_deref().unwrap_or("")),
        t = esc(text.as_deref().unwrap_or("")),
    );
    if filter.status == Some(Status::Failed) {
        if let Some(q) = &filter.queue {
            let body =
                serde_json::json!({"filter": {"status": "failed", "queue": q}, "limit": 10000})
                    .to_string();
            b.push_str(&button(
                app,
                "Retry all failed in this queue",
                "/api/v1/tasks/retry",
                &body,
                &format!("Retry every failed task in queue {q}?"),
                "",
            ));
        }
    }
    if p.tasks.is_empty() {
        b.push_str("<p class=\"empty\">No tasks match.</p>");
    } else {
        b.push_str("<table class=\"tasks\"><thead><tr><th>id</th><th>kind</th><th>queue</th><th>status</th><th class=\"n\">attempts</th><th>created</th><th>last error</th></tr></thead><tbody>");
        for t in &p.tasks {
            b.push_str(&task_row(t));
        }
        b.push_str("</tbody></table>");
    }
    for c in &p.corrupt {
        let _ = write!(
            b,
            "<p class=\"err\">record at {} does not decode: {}</p>",
            esc(&c.key),
            esc(&c.reason)
        );
    }
    if let Some(c) = p.next_cursor {
        let mut next = qs(filter.status);
        next.push_str(&format!("&cursor={c}"));
        let _ = write!(
            b,
            "<p><a class=\"next\" href=\"{}\">Next page →</a></p>",
            esc(&next)
        );
    }
    page(app, 200, "Tasks", "Tasks", &b, None)
}

fn task_row(t: &TaskInfo) -> String {
    let err = t
        .last_error
        .as_ref()
        .map(|e| format!("{}: {}", e.error_type, e.message))
        .unwrap_or_default();
    let short: String = err.chars().take(80).collect();
    format!(
        "<tr><td><a href=\"/tasks/{id}\"><code>{id}</code></a></td><td>{}</td><td>{}</td><td>{}</td><td class=\"n\">{}/{}</td><td>{}</td><td class=\"errcell\">{}</td></tr>",
        esc(&t.kind),
        esc(&t.queue),
        pill(t.status),
        t.attempts,
        u64::from(t.max_retries) + 1,
        t.created_at,
        esc(&short),
        id = t.id,
    )
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| "?".into())
}

fn task(app: &App<'_>, id: &str) -> Resp {
    let Ok(id) = id.parse::<TaskId>() else {
        return page(
            app,
            400,
            "Task",
            "Tasks",
            &format!("<p class=\"err\">{} is not a task id.</p>", esc(id)),
            None,
        );
    };
    let t = match app.queue.get(id) {
        Ok(Some(t)) => t,
        Ok(None) => {
            return page(
                app,
                404,
                "Task",
                "Tasks",
                &format!("<p class=\"err\">Task {id} not found.</p>"),
                None,
            )
        }
        Err(e) => return error_page(app, &e),
    };
    let history = app.queue.history(id).unwrap_or_default();
    let mut b = String::new();
    let _ = write!(
        b,
        "<p class=\"status\">{} <code>{id}</code></p><div class=\"actions\">",
        pill(t.status)
    );
    let base = format!("/api/v1/tasks/{id}");
    if matches!(t.status, Status::Failed | Status::Cancelled) {
        b.push_str(&button(
            app,
            "Retry",
            &format!("{base}/retry"),
            "{}",
            "Retry this task with a fresh budget?",
            "primary",
        ));
    }
    if matches!(t.status, Status::Pending | Status::Running) {
        let msg = if t.status == Status::Running {
            "Cancel this running task? Its handler is asked to stop; the attempt ends Cancelled."
        } else {
            "Cancel this task?"
        };
        b.push_str(&button(
            app,
            "Cancel",
            &format!("{base}/cancel"),
            "{}",
            msg,
            "danger",
        ));
    }
    b.push_str("</div><table class=\"fields\"><tbody>");
    let row = |b: &mut String, k: &str, v: String| {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    };
    row(&mut b, "kind", esc(&t.kind));
    row(&mut b, "queue", esc(&t.queue));
    row(
        &mut b,
        "attempts",
        format!("{} of at most {}", t.attempts, u64::from(t.max_retries) + 1),
    );
    row(&mut b, "priority", t.priority.to_string());
    row(&mut b, "created", t.created_at.to_string());
    row(&mut b, "next run", t.next_run_at.to_string());
    row(
        &mut b,
        "started",
        t.started_at
            .map(|x| x.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    row(
        &mut b,
        "finished",
        t.finished_at
            .map(|x| x.to_string())
            .unwrap_or_else(|| "-".into()),
    );
    b.push_str("</tbody></table>");
    let _ = write!(
        b,
        "<h2>Payload</h2><pre class=\"json\" id=\"payload\">{}</pre>",
        esc(&pretty(&t.payload_json()))
    );
    if let Some(r) = t.result_json() {
        let _ = write!(
            b,
            "<h2>Result</h2><pre class=\"json\" id=\"result\">{}</pre>",
            esc(&pretty(&r))
        );
    }
    if let Some(e) = &t.last_error {
        let _ = write!(
            b,
            "<h2>Last error</h2><p class=\"err\" id=\"last-error\"><b>{}</b>{}: {}</p>",
            esc(&e.error_type),
            if e.permanent { " (permanent)" } else { "" },
            esc(&e.message)
        );
    }
    let _ = write!(
        b,
        "<h2>Error history <small>{}</small></h2>",
        t.errors.len()
    );
    if t.errors.is_empty() {
        b.push_str("<p class=\"empty\">No errors.</p>");
    } else {
        b.push_str("<table class=\"errors\" id=\"errors\"><thead><tr><th class=\"n\">#</th><th>type</th><th>kind</th><th class=\"n\">retry</th><th>at</th><th>message</th></tr></thead><tbody>");
        for (i, e) in t.errors.iter().enumerate() {
            let _ = write!(
                b,
                "<tr><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td></tr>",
                i + 1,
                esc(&e.error_type),
                if e.permanent { "permanent" } else { "transient" },
                e.retry_count,
                e.timestamp,
                esc(&e.message)
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(
        b,
        "<h2>Timeline <small>{}</small></h2><ol class=\"timeline\" id=\"timeline\">",
        history.len()
    );
    for e in &history {
        let _ = write!(
            b,
            "<li><span class=\"at\">{}</span> {} → {} <span class=\"attempt\">attempt {}</span> <span class=\"cause\">{}</span></li>",
            e.at,
            e.from.map(pill).unwrap_or_else(|| "·".into()),
            pill(e.to),
            e.attempt,
            esc(&e.cause.to_string())
        );
    }
    b.push_str("</ol>");
    let refresh = (!t.status.is_terminal()).then_some(1000);
    page(app, 200, &format!("Task {}", t.kind), "Tasks", &b, refresh)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escaping_covers_every_special_character() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(url("a b/<"), "a%20b%2F%3C");
    }
}
