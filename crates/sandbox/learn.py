import os,re,sys,collections,glob
dirs=sys.argv[1:]
files={}
for d in dirs:
    for f in glob.glob(d+'/*.*'):
        tid=f.rsplit('.',1)[1]
        files[(d,tid)]=f
name_re=re.compile(r'^(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)')
marker_re=re.compile(r'write\(-1, "ferry-seccomp:([a-z-]+)"')
clone_re=re.compile(r'^(?:clone3?|fork|vfork)\(.*= (\d+)')
clone_res_re=re.compile(r'^<\.\.\. (?:clone3?|vfork) resumed>.*= (\d+)')
info={}
for key,f in files.items():
    calls=[]; marks=[]; children=[]; tname=None
    for i,line in enumerate(open(f,errors='replace')):
        m=marker_re.search(line)
        if m: marks.append((len(calls),m.group(1))); continue
        m=name_re.match(line)
        if m:
            n=m.group(1)
            calls.append(n)
            c=clone_re.match(line) or clone_res_re.match(line)
            if c: children.append((len(calls),(key[0],c.group(1))))
            mm=re.search(r'PR_SET_NAME, "([^"]*)"',line)
            if mm: tname=mm.group(1)
    info[key]=dict(calls=calls,marks=marks,children=children,name=tname)
def all_calls(key,seen=None):
    s=set(info[key]['calls'])
    for _,c in info[key]['children']:
        if c in info: s|=all_calls(c)
    return s
sets=collections.defaultdict(set)
who=collections.defaultdict(set)
for key,v in info.items():
    for pos,kind in v['marks']:
        s=set(v['calls'][pos:])
        for cpos,c in v['children']:
            if cpos>pos and c in info: s|=all_calls(c)
        sets[kind]|=s
        who[kind].add(v['name'])
for k in sorted(sets):
    print(k, sorted(map(str,who[k])))
    print('  ', ' '.join(sorted(sets[k])))
