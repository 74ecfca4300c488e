// Opens each cdc-lake dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core), logged in as Superset's admin; waits until every chart has rendered; fails
// if any shows an error, stays empty or never renders; saves a screenshot per dashboard.
//   node tools/superset_browser.mjs RESULTS_DIR
// Chromium resolves no host but 127.0.0.1 (--host-resolver-rules), so nothing it loads can
// leave the machine.
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const require = createRequire(path.join(process.env.CDC_LAKE_HOME, 'browser') + '/');
const { chromium } = require('playwright-core');

const base = `http://127.0.0.1:${process.env.SUPERSET_PORT || 18088}`;
const state = path.join(process.env.CDC_LAKE_RUN, 'superset');
const results = process.argv[2];
const DASHBOARDS = [
  ['sales-overview', 6],
  ['inventory', 4],
  ['books-and-authors', 4],
];

// What one chart holder shows: an error, an empty result, a rendered chart, or still loading.
function chartStates() {
  return [...document.querySelectorAll('.dashboard-component-chart-holder')].map((holder) => {
    const title = holder.querySelector('[data-test="editable-title"], .header-title, .editable-title')
      ?.textContent?.trim() || '?';
    const text = holder.innerText || '';
    if (holder.querySelector('.alert-danger, [role="alert"], [data-test="error-message"], .ant-alert-error')
        || /unexpected error|error occurred|failed/i.test(text)) {
      return { title, state: 'error', detail: text.slice(0, 200) };
    }
    if (/no results/i.test(text)) return { title, state: 'empty' };
    if (holder.querySelector('.loading, [aria-label="Loading"], .ant-skeleton')) return { title, state: 'loading' };
    const canvas = [...holder.querySelectorAll('canvas')].some((c) => c.width > 0 && c.height > 0);
    const tableRows = holder.querySelectorAll('table tbody tr').length;
    const bigNumber = holder.querySelector('.header-line')?.textContent?.trim();
    if (canvas) return { title, state: 'rendered', what: 'canvas' };
    if (tableRows > 0) return { title, state: 'rendered', what: `table of ${tableRows} rows` };
    if (bigNumber && /^no data/i.test(bigNumber)) return { title, state: 'empty' };
    if (bigNumber) return { title, state: 'rendered', what: `number ${bigNumber}` };
    return { title, state: 'loading' };
  });
}

const password = fs.readFileSync(path.join(state, 'admin-password'), 'utf8').trim();
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1'],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1400 } });
  // The login form is drawn by React: wait until the page has settled before typing into it.
  await page.goto(`${base}/login/`, { waitUntil: 'networkidle' });
  await page.fill('[data-test="username-input"]', 'admin');
  await page.fill('[data-test="password-input"]', password);
  await Promise.all([page.waitForURL((u) => !u.pathname.startsWith('/login')), page.keyboard.press('Enter')]);
  for (const [slug, expected] of DASHBOARDS) {
    const started = Date.now();
    await page.goto(`${base}/superset/dashboard/${slug}/`);
    let states = [];
    // Charts render as their queries return: poll the page until each holder has settled.
    for (;;) {
      states = await page.evaluate(chartStates);
      const settled = states.length === expected && states.every((s) => s.state !== 'loading');
      if (settled || Date.now() - started > 90_000) break;
      await page.waitForTimeout(500);
    }
    // ECharts animates bars and lines into place: wait until every canvas has stopped changing,
    // so the screenshot shows the final picture.
    let last = '';
    while (Date.now() - started < 90_000) {
      const now = await page.evaluate(() =>
        [...document.querySelectorAll('.dashboard-component-chart-holder canvas')]
          .map((c) => c.toDataURL().length + ':' + c.toDataURL().slice(-64)).join('|'));
      if (now === last) break;
      last = now;
      await page.waitForTimeout(300);
    }
    const shot = path.join(results, `superset-${slug}.png`);
    await page.screenshot({ path: shot, fullPage: true });
    const bad = states.filter((s) => s.state !== 'rendered');
    if (states.length !== expected || bad.length > 0) {
      failed = true;
      console.log(`FAIL ${slug}: ${states.length} of ${expected} charts, not rendered: ${JSON.stringify(bad)}`);
    } else {
      console.log(`ok  ${slug}: ${expected} charts rendered in ${((Date.now() - started) / 1000).toFixed(1)} s ` +
        `(${states.map((s) => s.what).join('; ')}); screenshot ${shot}`);
    }
  }
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
