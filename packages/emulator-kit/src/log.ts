// The emulators' log: silent unless the caller gives `onLog`, which receives one entry a line.

export interface EmulatorLogEntry {
  level: 'debug' | 'info' | 'warn';
  msg: string;
  [field: string]: unknown;
}

export type Log = (level: EmulatorLogEntry['level'], msg: string, fields?: Record<string, unknown>) => void;

/** A Log writing to `onLog`, or to nothing without one. */
export function createLog(onLog: ((entry: EmulatorLogEntry) => void) | undefined): Log {
  return (level, msg, fields = {}) => onLog?.({ level, msg, ...fields });
}
