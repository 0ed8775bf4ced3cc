// Drives the operator console in headless Chromium (Debian's package) with
// playwright-core: sign in, resolve an in-doubt refund as executed, replay
// a dead letter, with a screenshot after each step.
//
//   node check.mjs <base-url> <token> <in-doubt refund> <provider txn> <dead-letter refund> <out-dir>
//
// Run by `cargo test --test e2e console -- --ignored` (which sets up the
// refunds), or by hand against `scripts/run-local`. Needs
// `apt-get install chromium` and `npm install` in this folder.
import { chromium } from 'playwright-core';

const [base, token, doubt, txn, dead, out] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--no-first-run'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const fail = async (why) => { console.error(why); await browser.close(); process.exit(1); };

await page.goto(`${base}/console`);
if (!page.url().endsWith('/console/login')) await fail(`not sent to sign in: ${page.url()}`);
await page.fill('input[name=token]', token);
await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
await page.screenshot({ path: `${out}/console-overview.png`, fullPage: true });
if (!(await page.locator(`#doubt-${doubt}`).count())) await fail(`${doubt} not listed in doubt`);

const box = page.locator(`#doubt-${doubt} form`).first();
await box.locator('input[name=executed]').fill(txn);
await box.locator('input[name=by]').fill('dana');
await box.locator('input[name=reason]').fill('seen in the Hyp back office, OPS-88');
await Promise.all([page.waitForNavigation(), box.locator('button').click()]);
const resolved = await page.locator('#message').innerText();
await page.screenshot({ path: `${out}/console-resolved.png`, fullPage: true });
if (!resolved.includes('succeeded')) await fail(`resolve: ${resolved}`);

const row = page.locator(`#dead-${dead}`);
await Promise.all([page.waitForNavigation(), row.getByRole('button', { name: 'Replay', exact: true }).click()]);
const replayed = await page.locator('#message').innerText();
await page.screenshot({ path: `${out}/console-replayed.png`, fullPage: true });
if (!replayed.includes('replayed')) await fail(`replay: ${replayed}`);

console.log(JSON.stringify({ resolved, replayed }));
await browser.close();
