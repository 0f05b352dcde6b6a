-- A fixed-window rate limit shared by all workers.
-- KEYS: the window's counter
-- ARGV: wanted, limit, ttl ms
-- Answers how many of the wanted fit; what was refused is not counted.
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
local over = n - tonumber(ARGV[2])
if over <= 0 then return tonumber(ARGV[1]) end
local granted = math.max(0, tonumber(ARGV[1]) - over)
redis.call('DECRBY', KEYS[1], tonumber(ARGV[1]) - granted)  -- what was refused is not used
return granted
