// The admin dashboard's document shell (every page: one stylesheet from dashboard-style.ts, no
// external assets) and its sign-in page.
import { raw } from 'hono/html';
import type { Child } from 'hono/jsx';
import { DASHBOARD_CSS } from './dashboard-style.js';

/** Every dashboard page: the document shell with the one stylesheet. */
export function Page(props: { title: string; children: Child }) {
  return (
    <>
      {raw('<!doctype html>')}
      <html lang="en">
        <head>
          <meta charset="utf-8" />
          <meta name="viewport" content="width=device-width, initial-scale=1" />
          <meta name="robots" content="noindex" />
          <title>{props.title}</title>
          <style>{raw(DASHBOARD_CSS)}</style>
        </head>
        <body>{props.children}</body>
      </html>
    </>
  );
}

export function LoginPage(props: { error?: string }) {
  return (
    <Page title="meterbox admin: sign in">
      <main>
        <section class="login">
          <h1>meterbox admin</h1>
          {props.error ? (
            <p class="flash error" role="alert">
              {props.error}
            </p>
          ) : null}
          <form method="post" action="/admin/login">
            <label for="token">Admin token</label>
            <input
              id="token"
              name="token"
              type="password"
              autocomplete="current-password"
              required
              autofocus
            />
            <button type="submit">Sign in</button>
          </form>
          <p class="muted">
            The token is ADMIN_TOKEN. It is kept as a signed, HttpOnly session cookie for 12 hours.
          </p>
        </section>
      </main>
    </Page>
  );
}
