// Preact with htm (tagged templates, no build step): htm's prebuilt bundle of both, installed
// from the npm registry by scripts/webdeps.py (see gateway/web/webdeps.lock.json).
export {
  h,
  html,
  render,
  Component,
  useState,
  useEffect,
  useRef,
  useMemo,
  useCallback,
  useReducer,
} from "/static/vendor/htm/preact-standalone.module.js";
