// pino, JSON to stdout (readable lines in dev mode: readableDestination). One root logger per process,
// child loggers per subsystem.
import { pino } from 'pino';

export type Logger = pino.Logger;

export function createLogger(
  level: string,
  base: Record<string, unknown> = {},
  destination?: pino.DestinationStream,
): Logger {
  const options: pino.LoggerOptions = {
    level,
    base: { service: 'meterbox', ...base },
    redact: {
      paths: [
        'req.headers.authorization',
        'req.headers["stripe-signature"]',
        'req.headers.cookie',
        'headers.authorization',
        'headers["stripe-signature"]',
        '*.apiKey',
        '*.secret',
      ],
      censor: '[redacted]',
    },
    timestamp: pino.stdTimeFunctions.isoTime,
  };
  return destination ? pino(options, destination) : pino(options);
}

const LEVEL_NAMES: Record<number, string> = {
  10: 'TRACE',
  20: 'DEBUG',
  30: 'INFO ',
  40: 'WARN ',
  50: 'ERROR',
  60: 'FATAL',
};
/** Fields every line carries that a person reading the terminal does not need. */
const QUIET_FIELDS = new Set(['level', 'time', 'msg', 'service', 'mode', 'pid', 'hostname']);

function formatValue(value: unknown): string {
  if (typeof value === 'string') return /\s/.test(value) || value === '' ? JSON.stringify(value) : value;
  return JSON.stringify(value);
}

/** One pino JSON line as `16:12:03 INFO  message key=value …` (errors: their message, then the stack). */
export function formatReadable(line: string): string {
  let entry: Record<string, unknown>;
  try {
    entry = JSON.parse(line) as Record<string, unknown>;
  } catch {
    return line;
  }
  const time = typeof entry.time === 'string' ? entry.time.slice(11, 19) : '';
  const level = LEVEL_NAMES[Number(entry.level)] ?? String(entry.level);
  const parts = [time, level, String(entry.msg ?? '')];
  let stack = '';
  for (const [key, value] of Object.entries(entry)) {
    if (QUIET_FIELDS.has(key)) continue;
    if (key === 'err' && value && typeof value === 'object') {
      const err = value as { message?: unknown; stack?: unknown };
      parts.push(`err=${formatValue(err.message ?? '')}`);
      if (Number(entry.level) >= 50 && typeof err.stack === 'string') {
        stack = `\n    ${err.stack.split('\n').slice(1, 6).join('\n    ').trim()}`;
      }
      continue;
    }
    parts.push(`${key}=${formatValue(value)}`);
  }
  return `${parts.filter(Boolean).join(' ')}${stack}\n`;
}

/** A pino destination writing readable lines (dev mode); production logs stay JSON. */
export function readableDestination(out: NodeJS.WritableStream = process.stdout): pino.DestinationStream {
  return { write: (line: string) => void out.write(formatReadable(line)) };
}
