// GET /docs: the OpenAPI document rendered as one self-contained HTML page (no CDN, no script), so
// it works on machines without internet access.
import { html, raw } from 'hono/html';
import type { HtmlEscapedString } from 'hono/utils/html';
import { documentedRoutes } from './openapi.js';
import type { HttpModule } from './types.js';

type Html = HtmlEscapedString | Promise<HtmlEscapedString>;

interface Operation {
  summary?: string;
  tags?: string[];
  security?: Record<string, unknown>[];
  parameters?: { name: string; in: string; required?: boolean; schema?: unknown }[];
  requestBody?: { content?: Record<string, { schema?: unknown }> };
  responses?: Record<string, { description?: string; content?: Record<string, { schema?: unknown }> }>;
}

const STYLE = `
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2433; background: #f6f7f9; }
main { max-width: 960px; margin: 0 auto; padding: 1rem; }
h1 { margin: .5rem 0; } h2 { margin: 1.5rem 0 .5rem; text-transform: capitalize; }
details { background: #fff; border: 1px solid #d9dee7; border-radius: 8px; margin: .5rem 0; }
summary { padding: .6rem .8rem; cursor: pointer; display: flex; gap: .6rem; flex-wrap: wrap; align-items: baseline; }
.method { font: 600 .8rem ui-monospace, monospace; text-transform: uppercase; padding: .1rem .45rem; border-radius: 4px; color: #fff; background: #5d6b82; }
.get { background: #067647; } .post { background: #2e6bd9; } .patch, .put { background: #b54708; } .delete { background: #b42318; }
.path { font-family: ui-monospace, monospace; font-weight: 600; word-break: break-all; }
.auth { font-size: .8rem; color: #5d6b82; }
.body { padding: 0 .8rem .8rem; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; border-bottom: 1px solid #d9dee7; padding: .3rem .4rem; vertical-align: top; }
pre { background: #f6f7f9; border: 1px solid #d9dee7; border-radius: 6px; padding: .5rem; overflow-x: auto; font-size: .8rem; max-height: 24rem; }
`;

function schemaBlock(schema: unknown): Html {
  return html`<pre>${JSON.stringify(schema, null, 2)}</pre>`;
}

function operation(path: string, method: string, op: Operation): Html {
  const auth =
    op.security && op.security.length > 0
      ? op.security.map((s) => Object.keys(s).join(', ')).join(' or ')
      : 'none';
  const body = op.requestBody?.content?.['application/json']?.schema;
  return html`<details id="${method}-${path}">
<summary><span class="method ${method}">${method}</span><span class="path">${path}</span><span>${op.summary ?? ''}</span><span class="auth">auth: ${auth}</span></summary>
<div class="body">
${
  op.parameters?.length
    ? html`<h4>Parameters</h4><table><thead><tr><th>name</th><th>in</th><th>required</th><th>schema</th></tr></thead><tbody>${op.parameters.map(
        (p) =>
          html`<tr><td><code>${p.name}</code></td><td>${p.in}</td><td>${p.required ? 'yes' : 'no'}</td><td><code>${JSON.stringify(p.schema ?? {})}</code></td></tr>`,
      )}</tbody></table>`
    : ''
}
${body ? html`<h4>Request body (application/json)</h4>${schemaBlock(body)}` : ''}
<h4>Responses</h4>
${Object.entries(op.responses ?? {}).map(
  ([status, r]) =>
    html`<p><strong>${status}</strong> ${r.description ?? ''}</p>${Object.entries(r.content ?? {}).map(
      ([type, c]) => html`<p><code>${type}</code></p>${c.schema ? schemaBlock(c.schema) : ''}`,
    )}`,
)}
</div></details>`;
}

export function renderDocsPage(document: Record<string, unknown>): Html {
  const info = (document.info ?? {}) as { title?: string; version?: string; description?: string };
  const paths = (document.paths ?? {}) as Record<string, Record<string, Operation>>;
  const byTag = new Map<string, Html[]>();
  for (const [path, methods] of Object.entries(paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const tag = op.tags?.[0] ?? 'other';
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag)!.push(operation(path, method, op));
    }
  }
  return html`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${info.title ?? 'API'} ${info.version ?? ''} · API docs</title><style>${raw(STYLE)}</style></head>
<body><main>
<h1>${info.title ?? 'API'} <small>${info.version ?? ''}</small></h1>
<p>${info.description ?? ''}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI ${String(document.openapi ?? '')}).</p>
${[...byTag.entries()].map(([tag, ops]) => html`<h2>${tag}</h2>${ops}`)}
</main></body></html>`;
}

/** `getDocument` is read per request: the document is built after every module is registered. */
export function docsRoutes(getDocument: () => Record<string, unknown>): HttpModule {
  const routes = documentedRoutes('/');
  routes.route(
    {
      method: 'get',
      path: '/openapi.json',
      summary: 'This OpenAPI document',
      tag: 'operations',
      security: 'none',
      responses: { 200: { description: 'OpenAPI 3.0 document' } },
    },
    (c) => c.json(getDocument()),
  );
  routes.route(
    {
      method: 'get',
      path: '/docs',
      summary: 'The OpenAPI document rendered as HTML',
      tag: 'operations',
      security: 'none',
      responses: { 200: { description: 'HTML page', contentType: 'text/html' } },
    },
    (c) => c.html(renderDocsPage(getDocument())),
  );
  return routes;
}
