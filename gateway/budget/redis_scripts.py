"""The Lua scripts of the Redis budget store: each runs as one atomic step on the server.

Amounts travel as decimal integer strings and are handed to HINCRBY as they came: Redis's Lua
numbers are doubles, and `tostring` of a double prints 14 significant digits, so an amount is
never computed in Lua and written back. Lua only compares (doubles are exact to 2^53, and a
comparison past that is off by less than one part in 10^15 of the limit).

A team's keys: `KEYS[1]` is its epoch, a token written when Redis first holds any of its
counters; a window counter is a hash {used, reserved, epoch} and counts only while its epoch is
the team's: a counter Redis lost, or one left from before Redis lost the team's epoch, is
"missing" and must be seeded from the ledger before it counts.
"""

from __future__ import annotations

# reply codes of COUNTERS
MISSING, REFUSED, ADMITTED, READ = 0, 1, 2, 3

# KEYS[1]: the team's epoch; KEYS[2..]: its window counters.
# ARGV[1]: 'reserve' or 'read'; ARGV[2], to reserve: per window, the amount needed and the
# limit, space-separated (one argument rather than two per window: cheaper to send).
# Reply: {MISSING, i...} | {REFUSED, i...} | {ADMITTED, epoch} | {READ, used1, reserved1, ...}
COUNTERS = """
local epoch = redis.call('GET', KEYS[1])
local n = #KEYS - 1
local counters, missing = {}, {}
for i = 1, n do
  local c = redis.call('HMGET', KEYS[i + 1], 'used', 'reserved', 'epoch')
  if not epoch or c[3] ~= epoch then missing[#missing + 1] = i end
  counters[i] = c
end
if #missing > 0 then return {0, unpack(missing)} end
if ARGV[1] == 'read' then
  local out = {3}
  for i = 1, n do
    out[#out + 1] = counters[i][1]
    out[#out + 1] = counters[i][2]
  end
  return out
end
local needs, refused = {}, {}
for need, limit in string.gmatch(ARGV[2], '(%d+) (%d+)') do
  local i = #needs + 1
  local c = counters[i]
  needs[i] = need
  if tonumber(c[1]) + tonumber(c[2]) + tonumber(need) > tonumber(limit) then
    refused[#refused + 1] = i
  end
end
if #refused > 0 then return {1, unpack(refused)} end
for i = 1, n do
  if needs[i] ~= '0' then redis.call('HINCRBY', KEYS[i + 1], 'reserved', needs[i]) end
end
return {2, epoch}
"""

# KEYS[1]: the team's epoch; KEYS[2..]: window counters to seed.
# ARGV[1]: the epoch to write if the team has none; ARGV[2]: 'missing' (write only counters
# that are missing), 'set' (also set `used` of present ones, keeping what they hold
# reserved) or 'raise' (as 'set', but never lower a present `used`); then, per window,
# `used` and the milliseconds it lives ('0': for ever).
# Reply: the team's epoch.
SEED = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
for i = 1, #KEYS - 1 do
  local k, used, ttl = KEYS[i + 1], ARGV[2 * i + 1], ARGV[2 * i + 2]
  if redis.call('HGET', k, 'epoch') ~= epoch then
    redis.call('DEL', k)
    redis.call('HSET', k, 'used', used, 'reserved', '0', 'epoch', epoch)
    if ttl ~= '0' then redis.call('PEXPIRE', k, ttl) end
  elseif ARGV[2] == 'set' then
    redis.call('HSET', k, 'used', used)
  elseif ARGV[2] == 'raise' and tonumber(redis.call('HGET', k, 'used')) < tonumber(used) then
    redis.call('HSET', k, 'used', used)
  end
end
return epoch
"""

# KEYS: per window, the counter the reservation was made in and the counter of the period
# that holds now (the same key while the period lasts).
# ARGV[1]: the reservation's epoch; ARGV[2]: per window, the amount held and the amount
# spent, space-separated.
# A hold is released only from its own period and epoch, and never below 0: holds lost with
# Redis's data are not taken out of holds made since. Spending goes only to a counter that
# is present: a missing one is seeded from the ledger, which has this request.
SETTLE = """
local CAP = 4611686018427387904
local i = 0
for held, spent in string.gmatch(ARGV[2], '(%d+) (%d+)') do
  i = i + 1
  local old, cur = KEYS[2 * i - 1], KEYS[2 * i]
  if old == cur and held ~= '0' and redis.call('HGET', old, 'epoch') == ARGV[1] then
    local reserved = tonumber(redis.call('HGET', old, 'reserved'))
    if reserved <= tonumber(held) then
      redis.call('HSET', old, 'reserved', '0')
    else
      redis.call('HINCRBY', old, 'reserved', '-' .. held)
    end
  end
  if spent ~= '0' and redis.call('HEXISTS', cur, 'epoch') == 1 then
    if tonumber(redis.call('HGET', cur, 'used')) + tonumber(spent) >= CAP then
      redis.call('HSET', cur, 'used', '4611686018427387904')
    else
      redis.call('HINCRBY', cur, 'used', spent)
    end
  end
end
return 0
"""

# KEYS[1]: a lock; ARGV[1]: the token it was taken with. Deletes it only if still ours.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# the largest amount a counter holds (2^62): HINCRBY works on signed 64-bit integers
CAP = 2**62
