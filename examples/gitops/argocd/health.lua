-- Argo CD health check for finetune.dev/FineTuneJob, read from the operator's status conditions.
-- Succeeded=True -> Healthy; Failed=True or Stalled=True or Accepted=False -> Degraded;
-- Suspended=True -> Suspended; anything else (accepted, queued, running) -> Progressing.
-- Conditions older than metadata.generation describe a previous spec: Progressing until observed.
local hs = {status = "Progressing", message = "Waiting for the operator to accept the job"}
if obj.status == nil or obj.status.conditions == nil then
  return hs
end

local generation = obj.metadata and obj.metadata.generation or nil
local conditions = {}
for _, c in ipairs(obj.status.conditions) do
  if c.type ~= nil then
    conditions[c.type] = c
  end
end

local function is(type_, status)
  local c = conditions[type_]
  if c == nil or c.status ~= status then
    return false
  end
  -- A condition set for an older generation says nothing about the current spec.
  if generation ~= nil and c.observedGeneration ~= nil and c.observedGeneration < generation then
    return false
  end
  return true
end

local function describe(type_, fallback)
  local c = conditions[type_]
  local text = fallback
  if c ~= nil then
    if c.message ~= nil and c.message ~= "" then
      text = c.message
    elseif c.reason ~= nil and c.reason ~= "" then
      text = c.reason
    end
  end
  return text
end

if is("Failed", "True") then
  hs.status = "Degraded"
  hs.message = describe("Failed", "Training failed")
elseif is("Stalled", "True") then
  hs.status = "Degraded"
  hs.message = describe("Stalled", "The job is stuck")
elseif is("Accepted", "False") then
  hs.status = "Degraded"
  hs.message = describe("Accepted", "The spec was rejected")
elseif is("Succeeded", "True") then
  hs.status = "Healthy"
  hs.message = describe("Succeeded", "Training succeeded")
elseif is("Suspended", "True") then
  hs.status = "Suspended"
  hs.message = describe("Suspended", "The job is suspended")
elseif is("Running", "True") then
  hs.message = describe("Running", "Training")
  local progress = obj.status.progress
  if progress ~= nil and progress.progressPercentage ~= nil then
    hs.message = hs.message .. " (" .. tostring(progress.progressPercentage) .. "%)"
  end
elseif conditions["Reconciling"] ~= nil and conditions["Reconciling"].status == "True" then
  hs.message = describe("Reconciling", "Reconciling")
elseif is("Accepted", "True") then
  hs.message = describe("Accepted", "Accepted; waiting for the training pods")
end
return hs
