// pino, JSON to stdout. One root logger per process, child loggers per subsystem.
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
