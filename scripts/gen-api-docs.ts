// `npm run docs:api`: renders docs/http-api.md from the OpenAPI document the app serves (GET /openapi.json),
// so the API reference is written once, next to each route (src/http/openapi.ts). `npm run docs:check`
// renders it again and fails when the committed page differs.
import { writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createApp } from '../src/api/app.js';
import { loadConfig } from '../src/config.js';
import { createContext } from '../src/context.js';

/** Where the generated page lives, relative to the repository. */
export const API_DOCS_FILE = 'docs/http-api.md';

interface Schema {
  type?: string | string[];
  format?: string;
  enum?: unknown[];
  const?: unknown;
  properties?: Record<string, Schema>;
  required?: string[];
  items?: Schema;
  anyOf?: Schema[];
  oneOf?: Schema[];
  nullable?: boolean;
  minimum?: number;
  maximum?: number;
  minLength?: number;
  maxLength?: number;
  minItems?: number;
  maxItems?: number;
  default?: unknown;
  description?: string;
}

interface Operation {
  summary?: string;
  tags?: string[];
  security?: Record<string, unknown>[];
  parameters?: { name: string; in: string; required?: boolean; schema?: Schema }[];
  requestBody?: { content?: Record<string, { schema?: Schema }> };
  responses?: Record<string, { description?: string; content?: Record<string, { schema?: Schema }> }>;
}

export interface OpenApiDocument {
  info: { title: string; version: string; description?: string };
  components?: { securitySchemes?: Record<string, Record<string, string>> };
  paths: Record<string, Record<string, Operation>>;
}

/** The OpenAPI document, from the app built on a context that never connects to a database. */
export async function openApiDocument(): Promise<OpenApiDocument> {
  const config = loadConfig({
    // Nothing listens there, and nothing is connected: building the app and its document runs no query.
    // Every other setting keeps its default, so the document (batch limits included) is the default one.
    DATABASE_URL: 'postgres://docs-check@127.0.0.1:1/docs-check',
    LOG_LEVEL: 'silent',
    ADMIN_TOKEN: 'docs-check-admin-token',
  });
  const ctx = await createContext(config, { applicationName: 'meterbox-docs' });
  try {
    const res = await createApp(ctx).request('/openapi.json');
    return (await res.json()) as OpenApiDocument;
  } finally {
    await ctx.close();
  }
}

const MAX_SAFE = Number.MAX_SAFE_INTEGER;
const AUTH: Readonly<Record<string, string>> = {
  apiKey: 'API key',
  admin: 'admin token',
  stripeSignature: 'Stripe signature',
  usageToken: 'usage token',
};

/** A table cell: one line, pipes escaped. */
function cell(text: string): string {
  return text.replace(/\s*\n\s*/g, ' ').replaceAll('|', '\\|');
}

function code(text: string): string {
  return `\`${text}\``;
}

function typeOf(schema: Schema): string {
  const alternatives = schema.anyOf ?? schema.oneOf;
  if (alternatives) {
    const parts = [...new Set(alternatives.map(typeOf))];
    return parts.join(' or ') + (schema.nullable ? ' or null' : '');
  }
  if (schema.enum) return schema.enum.map((v) => code(JSON.stringify(v))).join(' or ');
  if (schema.const !== undefined) return code(JSON.stringify(schema.const));
  let type = Array.isArray(schema.type) ? schema.type.join(' or ') : (schema.type ?? 'any');
  if (type === 'array') type = schema.items ? `array of ${typeOf(schema.items)}` : 'array';
  if (schema.format) type += ` (${schema.format})`;
  return schema.nullable ? `${type} or null` : type;
}

/** Bounds, default and description of a schema, in words. */
function notes(schema: Schema): string {
  const out: string[] = [];
  const bound = (n: number | undefined) => n !== undefined && Math.abs(n) < MAX_SAFE;
  const range = (what: string, min: number | undefined, max: number | undefined) => {
    if (min !== undefined && max !== undefined) out.push(`${what}${min} to ${max}`);
    else if (min !== undefined) out.push(`${what}≥ ${min}`);
    else if (max !== undefined) out.push(`${what}≤ ${max}`);
  };
  range(
    '',
    bound(schema.minimum) ? schema.minimum : undefined,
    bound(schema.maximum) ? schema.maximum : undefined,
  );
  range('length ', schema.minLength, schema.maxLength);
  range('items ', schema.minItems, schema.maxItems);
  if (schema.default !== undefined) out.push(`default ${code(JSON.stringify(schema.default))}`);
  if (schema.description) out.push(schema.description);
  return out.join('; ');
}

/** An object's fields, nested ones as `a.b` and `a[].b`. */
function fieldRows(schema: Schema, prefix = '', rows: string[] = []): string[] {
  const variants = schema.anyOf ?? schema.oneOf;
  if (variants && !schema.properties) {
    for (const variant of variants) fieldRows(variant, prefix, rows);
    return rows;
  }
  const required = new Set(schema.required ?? []);
  for (const [name, field] of Object.entries(schema.properties ?? {})) {
    const path = `${prefix}${name}`;
    const row = `| ${code(path)} | ${cell(typeOf(field))} | ${required.has(name) ? 'yes' : 'no'} | ${cell(notes(field))} |`;
    if (!rows.includes(row)) rows.push(row);
    const inner = field.type === 'array' ? field.items : field;
    const nested = inner && (inner.properties || (inner.anyOf ?? inner.oneOf)?.some((s) => s.properties));
    if (inner && nested) fieldRows(inner, `${path}${field.type === 'array' ? '[]' : ''}.`, rows);
  }
  return rows;
}

function fieldTable(schema: Schema): string[] {
  const rows = fieldRows(schema);
  if (rows.length === 0) return [`A ${cell(typeOf(schema))}.`];
  return ['| field | type | required | notes |', '|---|---|---|---|', ...rows];
}

function authOf(op: Operation): string {
  // Alternatives (OpenAPI: one entry each) read "API key or usage token".
  const schemes = (op.security ?? []).map((entry) => Object.keys(entry)[0]).filter((s) => s !== undefined);
  return schemes.length > 0 ? schemes.map((s) => AUTH[s] ?? s).join(' or ') : 'none';
}

/** GitHub's anchor of a heading made of one code span. */
function anchorOf(heading: string): string {
  return heading
    .replace(/[`]/g, '')
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

function renderOperation(method: string, path: string, op: Operation): string[] {
  const lines = [
    `### ${code(`${method.toUpperCase()} ${path}`)}`,
    '',
    op.summary ?? '',
    '',
    `Auth: ${authOf(op)}.`,
  ];
  const parameters = op.parameters ?? [];
  if (parameters.length > 0) {
    lines.push('', '| parameter | in | type | required | notes |', '|---|---|---|---|---|');
    for (const p of parameters) {
      const schema = p.schema ?? {};
      lines.push(
        `| ${code(p.name)} | ${p.in} | ${cell(typeOf(schema))} | ${p.required ? 'yes' : 'no'} | ${cell(notes(schema))} |`,
      );
    }
  }
  for (const [type, body] of Object.entries(op.requestBody?.content ?? {})) {
    lines.push('', `Request body (${code(type)}):`, '', ...fieldTable(body.schema ?? {}));
  }
  const responses = Object.entries(op.responses ?? {}).filter(([status]) => status !== 'default');
  lines.push('', 'Responses:', '');
  for (const [status, response] of responses) {
    const content = Object.entries(response.content ?? {});
    if (content.length === 0) {
      lines.push(`* **${status}** ${response.description ?? ''}`.trimEnd());
      continue;
    }
    for (const [type, body] of content) {
      lines.push(`* **${status}** ${response.description ?? ''} (${code(type)})`, '');
      const schema = body.schema ?? {};
      const table = schema.properties || schema.anyOf || schema.oneOf ? fieldTable(schema) : [];
      for (const line of table) lines.push(`  ${line}`);
      if (table.length > 0) lines.push('');
    }
  }
  if (lines.at(-1) === '') lines.pop();
  lines.push('', 'Errors: the [error shape](#errors).');
  return lines;
}

/** docs/http-api.md, rendered from the document. */
export function renderApiDocs(doc: OpenApiDocument): string {
  const operations: { method: string; path: string; op: Operation; tag: string }[] = [];
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      operations.push({ method, path, op, tag: op.tags?.[0] ?? 'other' });
    }
  }
  const tags = [...new Set(operations.map((o) => o.tag))];
  const lines: string[] = [
    '# HTTP API',
    '',
    '<!-- Generated by `npm run docs:api` from the OpenAPI document (each route registers its description',
    '     with src/http/openapi.ts). Do not edit by hand: `npm run docs:check` fails when this page differs',
    '     from what the generator renders. -->',
    '',
    `${doc.info.description ?? doc.info.title} API version ${doc.info.version}.`,
    'Every API process serves this document as `GET /openapi.json` and renders it at `GET /docs`.',
    'What ingestion accepts, bills and answers, beyond the shapes below: [concepts](concepts.md#ingestion).',
    '',
    '## Authentication',
    '',
    '| scheme | sent as | what |',
    '|---|---|---|',
  ];
  for (const [name, scheme] of Object.entries(doc.components?.securitySchemes ?? {})) {
    const sentAs =
      scheme.type === 'http'
        ? `\`Authorization: Bearer <${AUTH[name] ?? name}>\``
        : `\`${scheme.name}\` header`;
    const what =
      name === 'stripeSignature'
        ? "Stripe's signature of the raw body, checked against `STRIPE_WEBHOOK_SECRET`"
        : (scheme.description ?? '');
    lines.push(`| ${AUTH[name] ?? name} | ${sentAs} | ${cell(what)} |`);
  }
  lines.push(
    '',
    'The dashboard (`/admin`, tag *admin dashboard*) also accepts the session cookie its sign-in form sets.',
    '',
    '## Errors',
    '',
    'Every error answer has one shape; `message` is for people, `code` for programs, and `details` lists',
    'what was wrong with each offending item (`index` into a batch, or the `field`):',
    '',
    '```json',
    '{"error": {"code": "validation_failed", "message": "…", "details": [{"index": 0, "message": "…"}]}}',
    '```',
    '',
    '## Routes',
    '',
    '| route | auth | summary |',
    '|---|---|---|',
  );
  for (const tag of tags) {
    for (const { method, path, op } of operations.filter((o) => o.tag === tag)) {
      const heading = code(`${method.toUpperCase()} ${path}`);
      const first = (op.summary ?? '').split(/(?<=\.)\s/)[0] ?? '';
      lines.push(`| [${heading}](#${anchorOf(heading)}) | ${authOf(op)} | ${cell(first)} |`);
    }
  }
  for (const tag of tags) {
    lines.push('', `## ${tag[0]!.toUpperCase()}${tag.slice(1)}`);
    for (const { method, path, op } of operations.filter((o) => o.tag === tag)) {
      lines.push('', ...renderOperation(method, path, op));
    }
  }
  return `${lines.join('\n')}\n`;
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const root = join(dirname(fileURLToPath(import.meta.url)), '..');
  writeFileSync(join(root, API_DOCS_FILE), renderApiDocs(await openApiDocument()));
  console.log(`docs:api: wrote ${API_DOCS_FILE}`);
}
