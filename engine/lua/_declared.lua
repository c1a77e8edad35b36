-- Test mode only (engine.market.CHECK_DECLARED_KEYS), prepended before the helpers: every key a
-- command of the script touches must be declared in KEYS, as Redis Cluster requires and as no
-- single server checks. The server names each command's keys itself (COMMAND GETKEYS), so this
-- knows no command's syntax. `redis` here shadows the global for the rest of the script.
local redis = (function(server)
  local declared = {}
  for _, key in ipairs(KEYS) do declared[key] = true end
  local function check(...)
    local keys = server.pcall('COMMAND', 'GETKEYS', ...)
    if keys.err then return end -- a command that takes no key
    for _, key in ipairs(keys) do
      if not declared[key] then error('undeclared key ' .. key .. ' (' .. (...) .. ')') end
    end
  end
  return setmetatable({
    call = function(...)
      check(...)
      return server.call(...)
    end,
    pcall = function(...)
      check(...)
      return server.pcall(...)
    end,
  }, {__index = server})
end)(redis)
