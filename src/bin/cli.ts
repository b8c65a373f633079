// meterbox CLI: `meterbox <command> [--flags]`. Commands are registered in src/commands.ts; each
// lives next to the code it drives and receives a Context. Help needs no database.
import { parseCommandLine } from '../commands.js';
import { createContext } from '../context.js';
import { configOrExit, exitOnFatal } from './process.js';

const line = parseCommandLine(process.argv.slice(2));
if (line.kind === 'exit') {
  (line.stream === 'stdout' ? process.stdout : process.stderr).write(`${line.text}\n`);
  process.exit(line.code);
}
const config = configOrExit({ needDatabase: true });
try {
  const ctx = await createContext(config, { applicationName: 'meterbox-cli', noStatementDeadline: true });
  let code = 1;
  try {
    await ctx.boss.start();
    code = await line.command.run(ctx, { values: line.values, positionals: line.positionals });
  } finally {
    await ctx.close();
  }
  process.exit(code);
} catch (err) {
  exitOnFatal(err);
}
