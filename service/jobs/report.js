(function(){
const cfg = JSON.parse(document.getElementById('config').textContent);
const $ = (id) => document.getElementById(id);
const fmt = (v) => v === null || v === undefined ? '\u2013' : Number(v).toPrecision(4);
const text = (s) => { const d = document.createElement('div'); d.textContent = s; return d.innerHTML; };
const params = (p) => Object.keys(p).sort().map(k => k + '=' + (typeof p[k] === 'number' && !Number.isInteger(p[k]) ? Number(p[k]).toPrecision(3) : p[k])).join(', ') || 'defaults';
let completed = cfg.completed, ended = cfg.terminal.includes(cfg.status);
function show(job) {
  const st = $('status'); st.textContent = job.status; st.className = 'status ' + job.status;
  const p = job.progress, planned = p.train_steps_planned || 0;
  const frac = job.status === 'succeeded' ? 1 : planned ? Math.min(1, p.train_steps_done / planned) : 0;
  $('bar').style.width = (100 * frac).toFixed(1) + '%';
  let t = p.train_steps_done.toLocaleString('en') + ' of ' + planned.toLocaleString('en') + ' training steps';
  if (p.estimated_remaining_s !== null && p.estimated_remaining_s !== undefined) t += ', about ' + Math.round(p.estimated_remaining_s) + ' s left';
  const c = p.current_trial;
  if (c && job.status === 'running') t += '; trial ' + c.number + ' at step ' + c.step + '/' + c.steps;
  $('progress').textContent = t;
  if (job.best) $('best').innerHTML = '<b>' + text(job.best.augmentation) + '</b> (' + text(params(job.best.params)) + '), validation loss ' + fmt(job.best.validation_loss) + ', trial ' + job.best.trial_number;
  if (p.trials_completed !== completed) { completed = p.trials_completed; refreshTrials(job); }
}
async function refreshTrials(job) {
  const r = await fetch(cfg.trials, {headers: {'Accept': 'application/json'}});
  if (!r.ok) return;
  const rows = (await r.json()).trials.map(t => '<tr' + (job.best && job.best.trial_number === t.number ? ' class=best' : '') + '><td>' + t.number + '</td><td>' + (t.stage || '\u2013') + '</td><td>' + text(t.augmentation) + '</td><td>' + text(params(t.params)) + '</td><td>' + fmt(t.validation_loss) + '</td><td>' + (t.train_steps || '\u2013') + '</td><td>' + Math.round(t.duration_s) + 's</td><td>' + text(t.worker || '\u2013') + '</td><td>' + t.state + '</td></tr>');
  $('trials').tBodies[0].innerHTML = rows.join('');
}
if (!ended) {
  const source = new EventSource(cfg.stream);
  const finish = () => { if (ended) return; ended = true; source.close(); location.reload(); };
  source.addEventListener('progress', (e) => { const job = JSON.parse(e.data); show(job); if (cfg.terminal.includes(job.status)) finish(); });
  source.addEventListener('end', finish);
}
})();
