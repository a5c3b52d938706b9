#!/usr/bin/env node
// The `ukai` command. Disk I/O runs on libuv's thread pool; its size must
// be set before the pool starts, so the rest of the program is loaded
// only after this line.
process.env.UV_THREADPOOL_SIZE ??= '16'
const { main } = await import('./cli.js')
process.exitCode = await main(process.argv.slice(2))
