// Drives the omniq dashboard of a running queue in headless Chromium. Run by tests/browser.rs,
// which starts the queue and passes (environment):
//   OMNIQ_URL        base URL of the admin server (TCP, loopback)
//   OMNIQ_FAILED_ID  a FAILED task with two errors; its handler now succeeds
//   OMNIQ_XSS_ID     a FAILED task whose kind, payload and error message are HTML
//   OMNIQ_SHOTS      directory for one screenshot per page
//   CHROMIUM         the browser (default /usr/bin/chromium)
// Exits non-zero with a message on the first failed check.
"use strict";
const path = require("path");
const { chromium } = require("playwright-core");

const base = process.env.OMNIQ_URL;
const failedId = process.env.OMNIQ_FAILED_ID;
const xssId = process.env.OMNIQ_XSS_ID;
const shots = process.env.OMNIQ_SHOTS;
const TIMEOUT = 30000;

function check(cond, msg) {
  if (!cond) throw new Error("check failed: " + msg);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
    timeout: TIMEOUT,
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1200, height: 900 } });
    page.setDefaultTimeout(TIMEOUT);
    const problems = [];
    page.on("pageerror", (e) => problems.push("page error: " + e.message));
    page.on("console", (m) => {
      if (m.type() === "error") problems.push("console error: " + m.text());
    });
    const shot = (name) => page.screenshot({ path: path.join(shots, name + ".png"), fullPage: true });

    // Overview: counts per state.
    await page.goto(base + "/");
    check((await page.title()).includes("Overview"), "overview title");
    const failedCount = await page.textContent('.card.failed b');
    check(Number(failedCount) === 2, "two failed tasks on the overview, saw " + failedCount);
    await shot("overview");

    // Purge from the overview, confirmed: nothing is that old, so nothing goes.
    await page.fill("#purge-age", "1000d");
    let purgeConfirm = "";
    page.once("dialog", (d) => {
      purgeConfirm = d.message();
      d.accept();
    });
    await Promise.all([page.waitForEvent("load"), page.click("button.purge")]);
    check(purgeConfirm.includes("older than 1000d"), "purge asked for confirmation: " + purgeConfirm);
    check(Number(await page.textContent('.card.failed b')) === 2, "nothing purged");

    // Queues, with pause / resume behind a confirmation.
    await page.goto(base + "/queues");
    const row = page.locator('tr[data-queue="other"]');
    page.once("dialog", (d) => d.accept());
    await row.locator('button:has-text("Pause")').click();
    await page.waitForSelector('tr[data-queue="other"] .pill.paused');
    await shot("queues");
    page.once("dialog", (d) => d.accept());
    await page.locator('tr[data-queue="other"] button:has-text("Resume")').click();
    await page.waitForSelector('tr[data-queue="other"] button:has-text("Pause")');

    // Task list: failed tab, filters.
    await page.goto(base + "/tasks?status=failed");
    check(await page.locator('a[data-tab="failed"].on').count() === 1, "failed tab selected");
    check(await page.locator('a[href="/tasks/' + failedId + '"]').count() === 1, "failed task listed");
    await shot("tasks-failed");
    await page.fill('input[name="q"]', "flaky");
    await page.click('form.filters button[type="submit"]');
    await page.waitForURL(/q=flaky/);
    check(await page.locator("table.tasks tbody tr").count() === 1, "text filter finds one task");

    // The XSS task: everything renders as text, nothing runs.
    await page.goto(base + "/tasks/" + xssId);
    const payload = await page.textContent("#payload");
    check(payload.includes("<script>window.__xss=1</script>"), "payload shown as text: " + payload);
    const lastError = await page.textContent("#last-error");
    check(lastError.includes("<img src=x onerror=window.__xss=2>"), "error shown as text: " + lastError);
    check((await page.textContent("h1")).includes("<b>xss</b>"), "kind shown as text");
    check(await page.evaluate(() => window.__xss === undefined), "no injected script ran");
    check(await page.locator("main img, main b:text('xss')").count() === 0, "no injected elements");
    await shot("task-xss");

    // The failed task: its error history, then Retry (confirmed) until it shows Completed.
    await page.goto(base + "/tasks/" + failedId);
    check(await page.locator(".status .pill.failed").count() === 1, "shown as FAILED");
    const errors = await page.locator("#errors tbody tr").allTextContents();
    check(errors.length === 2, "two errors in the history, saw " + errors.length);
    check(errors[0].includes("upstream unavailable (attempt 1)"), "first error: " + errors[0]);
    check(errors[1].includes("upstream unavailable (attempt 2)"), "second error: " + errors[1]);
    await shot("task-failed");
    let confirmed = "";
    page.once("dialog", (d) => {
      confirmed = d.message();
      d.accept();
    });
    await page.click('button:has-text("Retry")');
    await page.waitForSelector(".status .pill.completed", { timeout: TIMEOUT });
    check(confirmed.includes("Retry"), "a confirmation was asked: " + confirmed);
    const timeline = await page.textContent("#timeline");
    check(timeline.includes("manual retry"), "timeline shows the manual retry");
    check(timeline.includes("succeeded"), "timeline shows the success");
    check((await page.textContent("#result")).includes("recovered"), "result shown");
    await shot("task-completed");

    check(problems.length === 0, "no page or console errors: " + problems.join("; "));
  } finally {
    await browser.close();
  }
}

main().then(
  () => console.log("browser checks passed"),
  (e) => {
    console.error(e && e.stack ? e.stack : String(e));
    process.exit(1);
  }
);
