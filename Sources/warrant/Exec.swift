import ArgumentParser
import Client
import Crypto
import Foundation
import Synchronization
import WorkloadAPI

/// `warrant exec -- CMD ARGS...`: obtain the job's identity, run CMD with
/// it, keep it fresh while CMD runs, exit with CMD's status.
struct ExecCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exec",
        abstract: "Inside a CI job: obtain the job's identity, run a command with it, renew it while the command runs, and exit with the command's status.",
        discussion: """
            The command gets WARRANT_SVID_FILE, WARRANT_KEY_FILE, WARRANT_BUNDLE_FILE (PEM files, replaced together on renewal, links through WARRANT_IDENTITY_DIR/..data, \
            and the bundle also when the cluster's changes), \
            WARRANT_IDENTITY_DIR and WARRANT_SPIFFE_ID. The identity is renewed at half its lifetime (with jitter); when renewal is \
            refused, a fresh platform token is used to join again. Without --out the files live in a private temporary directory, \
            removed when the command exits. SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to the command's process group.

            Examples:
              warrant exec --endpoint warrant.example.com:8443 --ca-file warrant-ca.pem --audience warrant.example.com -- terraform apply
              warrant exec --token-source gitlab -- ./deploy.sh production
            """)

    @OptionGroup var job: JobOptions
    @Option(help: "Keep the identity in this directory (default: a private temporary one, removed at exit).") var out: String?
    @Option(help: "Give the command an identity for this step only (<job's SPIFFE ID>/step/NAME), closed in the audit with its exit status.")
    var step: String?
    @Option(name: .customLong("jwt-audience"), help: "Also keep a JWT-SVID for this audience (repeat for more): jwt-<audience>.token; the first is $WARRANT_JWT_FILE.")
    var jwtAudiences: [String] = []
    @Option(name: .customLong("jwt-ttl"), help: "The JWT-SVIDs' lifetime in seconds (default: the cluster's, at most an hour); each is fetched again at half of it.")
    var jwtTTL: UInt32?
    @Option(help: "Set AWS_ROLE_ARN to this and AWS_WEB_IDENTITY_TOKEN_FILE to a JWT-SVID for sts.amazonaws.com, so unchanged AWS SDKs and the AWS CLI use the job's identity.")
    var awsRoleArn: String?
    @Option(help: "How often to ask the cluster for its trust bundle and JWT keys, in seconds, 1 to 3600 (bundle.pem and the Workload API follow when they change).")
    var bundleRefresh: Double = 60
    @Argument(parsing: .postTerminator, help: "The command to run, after --.") var command: [String] = []

    func run() async throws {
        var status: Int32 = 0
        try await failingAsOneLine("exec") {
            guard !command.isEmpty else { throw JobFailure(description: "give the command to run after --, for example: warrant exec -- terraform apply") }
            let environment = ProcessInfo.processInfo.environment
            let options = try job.resolve(environment)
            try checkBundleRefresh(bundleRefresh)
            var temporary: String?
            let directory: String
            if let out = out ?? options.out {
                directory = out
            } else {
                var template = Array("\(NSTemporaryDirectory().hasSuffix("/") ? NSTemporaryDirectory() : NSTemporaryDirectory() + "/")warrant-exec-XXXXXX".utf8CString)
                guard let made = mkdtemp(&template) else { throw JobFailure(description: "cannot make a private temporary directory") }
                // Resolved (a TMPDIR with `..` or links in it): the watchdog
                // removes only a path of the plain shape.
                if let resolved = realpath(made, nil) {
                    directory = String(cString: resolved)
                    free(resolved)
                } else {
                    directory = String(cString: made)
                }
                temporary = directory
            }
            defer { if let temporary { try? FileManager.default.removeItem(atPath: temporary) } }
            let say: @Sendable (String) -> Void = { FileHandle.standardError.write(Data("warrant exec: \($0)\n".utf8)) }
            // The watchdog starts now, before the join and the files: a
            // SIGKILL of exec from here on leaves no private directory (nor
            // the key written into it) behind. It learns the command's
            // group once the command is spawned.
            let watchdog: ExecWatchdog?
            do {
                watchdog = try ExecWatchdog.start(removing: temporary)
            } catch {
                watchdog = nil
                say("no watchdog for the command (it would outlive a SIGKILL of this process): \(error)")
            }
            do {
                try IdentityFiles.checkWritable(directory: directory)
            } catch {
                throw JobFailure(description: "\(error)")
            }
            let key = P256.Signing.PrivateKey(compactRepresentable: false)
            var audiences = jwtAudiences
            if awsRoleArn != nil && !audiences.contains("sts.amazonaws.com") { audiences.append("sts.amazonaws.com") }
            let step = self.step
            // The job's identity, or one for this step derived from it.
            // For a step, the job's identity has a key of its own: the
            // step's svid.key, which its command holds, signs for the step
            // alone. One per attempt: a retry replaying the join's answer
            // gets the certificate made for the first try's key.
            let jobKeys = Mutex<(attempt: String, key: P256.Signing.PrivateKey)?>(nil)
            let acquire: @Sendable (P256.Signing.PrivateKey, String) async throws -> JobIdentity = { key, attempt in
                let jobKey = step == nil ? key : jobKeys.withLock { held in
                    if let held, held.attempt == attempt { return held.key }
                    let made = P256.Signing.PrivateKey(compactRepresentable: false)
                    held = (attempt, made)
                    return made
                }
                let job = try await JobIdentity.obtain(options, key: jobKey, environment: environment, attempt: attempt, say: say)
                guard let step else { return job }
                say("asking for an identity for step \(step)")
                return try await job.step(step, options, key: key, attempt: attempt)
            }
            let jwtTTL = self.jwtTTL
            if jwtTTL == 0 { throw JobFailure(description: "--jwt-ttl must be a positive number of seconds") }
            let identity = try await acquire(key, UUID().uuidString).withJWTs(audiences, options, ttl: jwtTTL)
            try identity.write(to: directory)
            // The SPIFFE Workload API for the command, on a socket beside the files.
            let agent = AgentIdentity(options: options, directory: directory, say: say)
            await agent.update(identity, key: key)
            let socketPath = "\(directory)/agent.sock"
            let workloadAPI: WorkloadAPIServer?
            do {
                workloadAPI = try WorkloadAPIServer(path: socketPath, feed: agent.feed, source: agent)
            } catch {
                workloadAPI = nil
                say("no SPIFFE Workload API for the command (SPIFFE_ENDPOINT_SOCKET is not set): \(error)")
            }
            say("\(identity.spiffeID) until \(identity.expiresAt.formatted(.iso8601)); running \(command[0])")

            var added = [
                "WARRANT_IDENTITY_DIR": directory, "WARRANT_SVID_FILE": "\(directory)/svid.pem", "WARRANT_KEY_FILE": "\(directory)/svid.key",
                "WARRANT_BUNDLE_FILE": "\(directory)/bundle.pem", "WARRANT_SPIFFE_ID": identity.spiffeID,
            ]
            if let first = audiences.first { added["WARRANT_JWT_FILE"] = "\(directory)/\(JobIdentity.jwtFileName(first))" }
            if workloadAPI != nil { added["SPIFFE_ENDPOINT_SOCKET"] = "unix://\(socketPath)" }
            if let awsRoleArn {
                added["AWS_ROLE_ARN"] = awsRoleArn
                added["AWS_WEB_IDENTITY_TOKEN_FILE"] = "\(directory)/\(JobIdentity.jwtFileName("sts.amazonaws.com"))"
                added["AWS_ROLE_SESSION_NAME"] = "warrant-" + String(identity.spiffeID.split(separator: "/").last ?? "job").prefix(40)
            }
            var childEnvironment = environment.merging(added) { $1 }
            if step != nil {
                // A step's command gets the step's identity, not the means to
                // the job's own: the platform token (or the runner's way to
                // ask for one) would let it join as the whole job.
                var platform = ["ACTIONS_ID_TOKEN_REQUEST_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_URL"]
                switch options.source {
                case .gitlab(let variable), .environment(let variable): platform.append(variable)
                default: break
                }
                let withheld = platform.filter { childEnvironment.removeValue(forKey: $0) != nil }
                if !withheld.isEmpty { say("withheld from the step's command: \(withheld.joined(separator: ", ")) (the job's platform token)") }
            }
            // Pass SIGINT, SIGTERM, SIGHUP and SIGQUIT on to the command's
            // group (its own children too), also one that comes before the
            // command exists; not one this process was started ignoring
            // (nohup's SIGHUP), which the command ignores as well.
            let signals = CommandSignals()
            var sources: [any DispatchSourceSignal] = []
            var inheritedIgnored: [Int32] = []
            for signalNumber in [SIGINT, SIGTERM, SIGHUP, SIGQUIT] {
                if ChildCommand.isIgnore(signal(signalNumber, SIG_IGN)) {
                    inheritedIgnored.append(signalNumber)
                    continue
                }
                let source = DispatchSource.makeSignalSource(signal: signalNumber)
                source.setEventHandler { signals.pass(signalNumber) }
                source.resume()
                sources.append(source)
            }
            let pid: pid_t
            do {
                pid = try ChildCommand.spawn(["/usr/bin/env"] + command, environment: childEnvironment, keepIgnored: inheritedIgnored)
            } catch {
                for source in sources { source.cancel() }
                throw JobFailure(description: "cannot run \(command[0]): \(error)")
            }
            signals.started(pid)
            // The command keeps a group of its own: a SIGKILL to the job's
            // group would end this process and leave the command running.
            watchdog?.watch(group: pid)
            let exited = Task { await ChildCommand.exitStatus(of: pid, signals: signals, watchdog: watchdog) }
            // (A temporary directory is removed on exit: a renewal still under way then writes nothing.)
            let remakeDirectory = temporary == nil
            let renewal = Task {
                await Self.keepFresh(identity, key: key, options: options, audiences: audiences, jwtTTL: jwtTTL, directory: directory, remakeDirectory: remakeDirectory,
                                     rejoin: acquire, say: say) { renewed, key in
                    await agent.update(renewed, key: key)
                }
            }
            let bundles = Task { [bundleRefresh] in await agent.keepBundlesFresh(every: .milliseconds(Int(bundleRefresh * 1000))) }
            let exitStatus = await exited.value
            // The command is gone (and no signal goes to its pid any more).
            // Cancelled, a renewal's request under way ends at once.
            bundles.cancel()
            renewal.cancel()
            // A bundle refresh under way writes nothing into a directory about to go.
            agent.stopWritingFiles()
            // Done before the directory goes: a renewal's write under way
            // could otherwise leave a key file behind. What it returns is
            // the identity as it is now (certificate and key of one renewal).
            let now = await renewal.value
            await workloadAPI?.stop()
            status = exitStatus
            if let step {
                // A signal from now on (a second Ctrl-C, the runner's SIGTERM
                // after the command ended) stops the closing at once
                // instead of being ignored until its requests time out.
                say("closing step \(step) in the audit")
                let closing = Task { try await now.closeStep(exitStatus: exitStatus, options) }
                signals.afterEnd { _ in closing.cancel() }
                do {
                    try await closing.value
                    say("step \(step) closed with exit status \(status)")
                } catch is CancellationError {
                    say("closing step \(step) stopped by a signal: it may not be closed in the audit (its identity then ends at its expiry)")
                } catch {
                    say("could not close step \(step) in the audit: \(error)")
                }
            }
            for source in sources { source.cancel() }
        }
        if status != 0 { throw ExitCode(status) }
    }

    /// Renews at half the lifetime (±10%, timed by this machine's clock from
    /// when the identity arrived, for the lifetime the certificate says),
    /// for a new key each time (a leaked key, its identity revoked, is not
    /// certified again); retries with backoff (1 to 30 s, jittered) while
    /// the cluster is unreachable or busy; joins again with a fresh
    /// platform token when renewal is refused (401, 403) or cannot work any
    /// more (the identity expired: the cluster's TLS refuses it). An
    /// identity obtained is kept even if what follows (its JWT-SVIDs, its
    /// files) fails and is retried: a platform token is never spent twice
    /// for one renewal. JWT-SVIDs living shorter than the X509-SVID (at
    /// most an hour) are fetched again at half their own lifetime. An
    /// identity or JWT-SVID past its expiry is removed rather than left for
    /// the command to use. With `remakeDirectory` false, a renewal does not
    /// make the output directory again once it is gone.
    /// Returns the identity held when cancelled.
    @discardableResult
    static func keepFresh(_ first: JobIdentity, key: P256.Signing.PrivateKey, options: JobOptions.Resolved, audiences: [String],
                          jwtTTL: UInt32? = nil, directory: String?, remakeDirectory: Bool = true, rejoin: @Sendable (P256.Signing.PrivateKey, _ attempt: String) async throws -> JobIdentity,
                          say: @escaping @Sendable (String) -> Void,
                          onRenewed: @Sendable (JobIdentity, P256.Signing.PrivateKey) async -> Void = { _, _ in }) async -> JobIdentity {
        var current = first
        // Never leave an expired identity in place: removed on the first
        // failure past its expiry, and at its expiry during a wait.
        func removeIfExpired() {
            guard let directory else { return }
            var files: [String] = []
            if current.localExpiry.timeIntervalSinceNow <= 0 {
                files = ["svid.pem", "svid.key"] + audiences.map(JobIdentity.jwtFileName)
            } else if let jwtExpiry = current.jwtLocalExpiry, jwtExpiry.timeIntervalSinceNow <= 0 {
                files = audiences.map(JobIdentity.jwtFileName)
            }
            var removed = false
            do {
                removed = try IdentityFiles.remove(files, from: directory)
            } catch {
                // The names go whatever failed, and the files of the current
                // version they led to (else carried into later versions).
                for file in files {
                    removed = (try? FileManager.default.removeItem(atPath: "\(directory)/\(file)")) != nil || removed
                    try? FileManager.default.removeItem(atPath: "\(directory)/..data/\(file)")
                }
            }
            if removed { say("the \(files.contains("svid.pem") ? "identity" : "JWT-SVIDs") expired; the files are removed until new ones arrive") }
        }
        /// Sleeps `seconds`, stopping at the next expiry on the way to remove what expired.
        func wait(_ seconds: Double) async {
            let deadline = Date().addingTimeInterval(seconds)
            for expiry in [current.jwtLocalExpiry, current.localExpiry].compactMap({ $0 }).sorted() where expiry > Date() && expiry < deadline {
                try? await Task.sleep(for: .milliseconds(Int(expiry.timeIntervalSinceNow * 1000) + 1))
                removeIfExpired()
            }
            try? await Task.sleep(for: .milliseconds(Int(max(0, deadline.timeIntervalSinceNow) * 1000)))
        }
        // bundle.pem is the agent's to write (`AgentIdentity`, given this
        // directory): it keeps the newest bundle, which a renewal's or a
        // JWT-SVID refresh's answer would otherwise put back to an older one.
        func write(_ identity: JobIdentity) throws {
            if let directory { try identity.write(to: directory, createDirectory: remakeDirectory, bundle: false) }
        }
        while !Task.isCancelled {
            // Drawn once per identity: every JWT-SVID refresh below ends by it.
            let due = current.issuedAt.addingTimeInterval(max(1, current.lifetime) * Double.random(in: 0.45...0.55))
            // JWT-SVIDs due before it: fetched again with this X509-SVID,
            // retried with backoff until it is due; refused (401, 403: the
            // identity revoked, say), left to the renewal, which can join again.
            var jwtBackoff = 1.0
            var renewNow = false
            while !Task.isCancelled, let jwtDue = current.jwtRefreshDue, jwtDue < due, Date() < due {
                await wait(max(0, jwtDue.timeIntervalSinceNow))
                guard !Task.isCancelled, Date() < due else { break }
                do {
                    let refreshed = try await current.withJWTs(audiences, options, ttl: jwtTTL)
                    try write(refreshed)
                    current = refreshed
                    jwtBackoff = 1.0
                } catch let failure as JobFailure where failure.status == 401 || failure.status == 403 {
                    say("fetching JWT-SVIDs again was refused (\(failure.description)); renewing now")
                    renewNow = true
                    break
                } catch {
                    // Cancelled (the command ended): its request was cut short, not refused.
                    if Task.isCancelled { break }
                    let pause = min(jwtBackoff * Double.random(in: 0.5...1), max(0, due.timeIntervalSinceNow))
                    say("fetching JWT-SVIDs again failed (\(error)); retrying in \(String(format: "%.1f", pause)) s")
                    await wait(pause)
                    jwtBackoff = min(30, jwtBackoff * 2)
                }
            }
            if !renewNow { await wait(max(0, due.timeIntervalSinceNow)) }
            var backoff = 1.0
            let newKey = P256.Signing.PrivateKey(compactRepresentable: false)
            // One idempotency nonce for the round's retries: one whose
            // answer was lost gets the identity already issued.
            let attempt = UUID().uuidString
            // Renewed (or joined again) but not yet delivered.
            var obtained: JobIdentity?
            // The cluster refused the job's join again (its rules no longer
            // admit it, or its platform token was spent): asked again only
            // every few minutes, not every 30 s for as long as it runs,
            // also after a failure of another kind in between.
            var rejoinRefused = false, everRefused = false
            // `obtained` is in the files and served already (with the JWT-SVIDs held).
            var deliveredEarly = false
            while !Task.isCancelled {
                do {
                    if let held = obtained, held.localExpiry.timeIntervalSinceNow <= 1 { obtained = nil }
                    if obtained == nil {
                        do {
                            obtained = try await current.renew(options, key: newKey, attempt: attempt)
                        } catch let failure as JobFailure where !Task.isCancelled && joinAgain(after: failure, current) {
                            removeIfExpired()
                            say("renewal \(failure.status == nil ? "impossible, the identity expired" : "refused") (\(failure.description)); "
                                + "joining again with a fresh platform token")
                            do {
                                obtained = try await rejoin(newKey, attempt)
                            } catch let refused as JobFailure where refused.status == 401 || refused.status == 403 {
                                rejoinRefused = true
                                throw refused
                            }
                        }
                        deliveredEarly = false
                    }
                    if !audiences.isEmpty, !deliveredEarly {
                        // The X509-SVID goes to the command at once, with
                        // the JWT-SVIDs held while they last: JWT-SVIDs that
                        // cannot be had now must not leave it the old
                        // certificate until that expires.
                        var delivered = obtained!
                        if let jwtExpiry = current.jwtLocalExpiry, jwtExpiry > Date() {
                            (delivered.jwts, delivered.jwtsReceived) = (current.jwts, current.jwtsReceived)
                        }
                        try write(delivered)
                        await onRenewed(delivered, newKey)
                        current = delivered
                        deliveredEarly = true
                    }
                    let renewed = try await obtained!.withJWTs(audiences, options, ttl: jwtTTL)
                    try write(renewed)
                    await onRenewed(renewed, newKey)
                    say("renewed: \(renewed.spiffeID) until \(renewed.expiresAt.formatted(.iso8601))")
                    current = renewed
                    break
                } catch {
                    if Task.isCancelled { break }
                    removeIfExpired()
                    if rejoinRefused { (backoff, everRefused) = (max(backoff, 60), true) }
                    let pause = backoff * Double.random(in: 0.5...1)
                    say(rejoinRefused
                        ? "joining again was refused (\(error)); the identity held is kept until it expires; trying again in \(String(format: "%.0f", pause)) s"
                        : "renewal failed (\(error)); retrying in \(String(format: "%.1f", pause)) s")
                    await wait(pause)
                    backoff = min(everRefused ? 600 : 30, backoff * 2)
                    rejoinRefused = false
                }
            }
        }
        return current
    }

    /// Whether a failed renewal calls for a fresh platform token: the
    /// cluster refused it as not allowed (401, 403; not a busy or failing
    /// cluster, where a platform token, usable once, would be spent for
    /// nothing), or the identity has expired, so no renewal can work.
    static func joinAgain(after failure: JobFailure, _ current: JobIdentity, now: Date = Date()) -> Bool {
        if let status = failure.status { return status == 401 || status == 403 }
        return current.localExpiry <= now
    }
}

/// The command `warrant exec` runs, started with posix_spawn rather than
/// Foundation's Process, which hands the child the spawning thread's
/// signal mask (a Swift concurrency thread blocks nearly every signal:
/// the command could not be interrupted, measured) and this process's
/// ignored SIGPIPE (NIO's).
enum ChildCommand {
    struct SpawnError: Error, CustomStringConvertible {
        var code: Int32
        var description: String { String(cString: strerror(code)) }
    }

    static func isIgnore(_ handler: __sighandler_t?) -> Bool {
        unsafeBitCast(handler, to: Int.self) == unsafeBitCast(SIG_IGN, to: Int.self)
    }

    /// Starts `arguments` (the first a path) in a process group of its own
    /// (as Foundation did: the terminal's signals reach this process, which
    /// passes them on once), with no signal blocked, SIGINT, SIGTERM,
    /// SIGHUP, SIGQUIT and SIGPIPE at their defaults but for
    /// `keepIgnored` (ignored when this process started), and no
    /// descriptor but 0, 1 and 2 (NIO's sockets are not close-on-exec).
    static func spawn(_ arguments: [String], environment: [String: String], keepIgnored: [Int32]) throws -> pid_t {
        try spawnInOwnGroup(arguments[0], arguments, environment: environment,
                            defaults: [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE].filter { !keepIgnored.contains($0) })
    }

    /// posix_spawn of `path` with `arguments` (argv[0] first) in a process
    /// group of its own, with no signal blocked, `defaults` at their
    /// default actions, the file actions `prepare` adds, then every
    /// descriptor from `closingFrom` up closed.
    static func spawnInOwnGroup(_ path: String, _ arguments: [String], environment: [String: String], defaults: [Int32] = [],
                                closingFrom first: Int32 = 3, prepare: (inout posix_spawn_file_actions_t) -> Void = { _ in }) throws -> pid_t {
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t(), defaultSet = sigset_t()
        sigemptyset(&none)
        sigemptyset(&defaultSet)
        for number in defaults { sigaddset(&defaultSet, number) }
        posix_spawnattr_setsigmask(&attributes, &none)
        posix_spawnattr_setsigdefault(&attributes, &defaultSet)
        posix_spawnattr_setpgroup(&attributes, 0)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETPGROUP))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        prepare(&actions)
        try closeFrom(first, &actions)
        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer { (argv + envp).forEach { free($0) } }
        var pid: pid_t = 0
        let code = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
        guard code == 0 else { throw SpawnError(code: code) }
        return pid
    }

    /// Every descriptor from `first` up closed in the child: glibc's
    /// posix_spawn_file_actions_addclosefrom_np (2.34 on, a GNU extension
    /// Swift's Glibc does not declare, so looked up), else each one open now.
    private static func closeFrom(_ first: Int32, _ actions: inout posix_spawn_file_actions_t) throws {
        typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>?, Int32) -> Int32
        if let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "posix_spawn_file_actions_addclosefrom_np") {
            let code = unsafeBitCast(symbol, to: CloseFrom.self)(&actions, first)
            guard code == 0 else { throw SpawnError(code: code) }
            return
        }
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? [] {
            if let descriptor = Int32(name), descriptor >= first { posix_spawn_file_actions_addclose(&actions, descriptor) }
        }
    }

    /// Waits, on a thread of its own, for `pid` to end: its exit status,
    /// or 128 + the signal that ended it. The command is marked gone in
    /// `signals` before it is reaped, so its pid, free for reuse once
    /// reaped, is never signalled after.
    static func exitStatus(of pid: pid_t, signals: CommandSignals, watchdog: ExecWatchdog?) async -> Int32 {
        await withCheckedContinuation { continuation in
            Thread.detachNewThread {
                var info = siginfo_t()
                while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) == -1 {
                    guard errno == EINTR else { break }
                }
                signals.ended()
                // Before the reaping: until then the group's number is not reused.
                watchdog?.standDown()
                var status: Int32 = 0
                while waitpid(pid, &status, 0) == -1 {
                    guard errno == EINTR else { return continuation.resume(returning: 1) }
                }
                watchdog?.reap()
                continuation.resume(returning: status & 0x7F == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F))
            }
        }
    }
}

/// Signals for the command: passed to its process group once it exists
/// (those that came before, in order, as soon as it does), never after it
/// ended; then given to what `afterEnd` names (one that came before it was
/// named, at once when it is).
final class CommandSignals: Sendable {
    private struct State {
        var pid: pid_t = 0
        var ended = false
        var early: [Int32] = []
        var afterEnd: (@Sendable (Int32) -> Void)?
        var late: Int32?
    }
    private let state = Mutex(State())

    func pass(_ signalNumber: Int32) {
        let afterEnd = state.withLock { state -> (@Sendable (Int32) -> Void)? in
            guard !state.ended else {
                if state.afterEnd == nil, state.late == nil { state.late = signalNumber }
                return state.afterEnd
            }
            guard state.pid > 0 else {
                if state.early.count < 8 { state.early.append(signalNumber) }
                return nil
            }
            Self.send(signalNumber, to: state.pid)
            return nil
        }
        afterEnd?(signalNumber)
    }

    /// What a signal does once the command ended.
    func afterEnd(_ body: @escaping @Sendable (Int32) -> Void) {
        let late = state.withLock { state -> Int32? in
            state.afterEnd = body
            defer { state.late = nil }
            return state.late
        }
        if let late { body(late) }
    }

    func started(_ pid: pid_t) {
        state.withLock { state in
            state.pid = pid
            for signalNumber in state.early { Self.send(signalNumber, to: pid) }
            state.early = []
        }
    }

    func ended() { state.withLock { $0.ended = true } }

    /// To its group, or to the command alone if it left the group.
    static func send(_ signalNumber: Int32, to pid: pid_t) {
        if kill(-pid, signalNumber) != 0 { kill(pid, signalNumber) }
    }
}

/// A small process of `warrant exec`'s own (this binary, started with
/// `__exec-watchdog GROUP [DIRECTORY]`, in a process group of its own)
/// that ends the command's group with SIGKILL if exec dies without
/// standing it down. A runner that kills the job's process group with
/// SIGKILL ends exec, but the command, in a group of its own, would go on
/// running (a terraform apply after the job was cancelled). The watchdog
/// reads a pipe only exec holds the other end of: `G` and four bytes (a
/// pid, little-endian) name the group to watch when GROUP was 0 (exec
/// starts the watchdog before the command exists); a byte 1 means the
/// command ended and nothing is to be done; the end of the pipe (exec
/// gone, however) means kill, if a group was named. Given exec's private
/// identity directory (made with mkdtemp when no --out was given), which
/// exec removes itself when it exits but cannot after a SIGKILL (the
/// identity's key would stay in the temporary directory), the watchdog
/// also waits for the end of the pipe (exec gone, whether it exited,
/// failed before its command, or was killed at any point) and then
/// removes that directory if it is still the one exec made.
struct ExecWatchdog: Sendable {
    static let argument = "__exec-watchdog"
    let pid: pid_t
    let standDownDescriptor: Int32

    /// Starts the watchdog for `group`, or (0) for a group named later
    /// with `watch(group:)`.
    static func start(for group: pid_t = 0, removing directory: String?) throws -> ExecWatchdog {
        // A watchdog gone early must not end this process at the stand-down's write (NIO ignores it too).
        signal(SIGPIPE, SIG_IGN)
        var ends: [Int32] = [-1, -1]
        guard pipe(&ends) == 0 else { throw ChildCommand.SpawnError(code: errno) }
        // (Nothing else is spawned meanwhile: the flag is set before any could inherit them.)
        for end in ends { _ = fcntl(end, F_SETFD, FD_CLOEXEC) }
        // Not already at 3, where the copy to 3 would be a no-op that
        // leaves it close-on-exec (older glibc).
        if ends[0] == 3 {
            let moved = fcntl(3, F_DUPFD_CLOEXEC, 10)
            close(3)
            ends[0] = moved
        }
        defer { close(ends[0]) }
        let pid: pid_t
        do {
            // No environment: the job's token is none of its business.
            pid = try ChildCommand.spawnInOwnGroup("/proc/self/exe", ["/proc/self/exe", argument, String(group)] + (directory.map { [$0] } ?? []), environment: [:], closingFrom: 4) { actions in
                posix_spawn_file_actions_adddup2(&actions, ends[0], 3)
                posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
                // Not the job's output: a runner waits for every holder of it to go.
                posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
                posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
            }
        } catch {
            close(ends[1])
            throw error
        }
        return ExecWatchdog(pid: pid, standDownDescriptor: ends[1])
    }

    /// Names the command's group (a watchdog started before the command).
    func watch(group: pid_t) {
        var message: [UInt8] = [UInt8(ascii: "G")]
        for shift in stride(from: 0, to: 32, by: 8) { message.append(UInt8(truncatingIfNeeded: UInt32(bitPattern: group) >> UInt32(shift))) }
        // Five bytes, less than PIPE_BUF: written whole or not at all.
        _ = message.withUnsafeBytes { write(standDownDescriptor, $0.baseAddress, $0.count) }
    }

    /// The command ended (and is not reaped yet): told so, the watchdog
    /// sends no signal (it reads the byte before any end of the pipe). The
    /// pipe stays open until exec exits: a watchdog keeping exec's private
    /// directory then removes it.
    func standDown() {
        var byte: UInt8 = 1
        _ = write(standDownDescriptor, &byte, 1)
    }

    /// Reaps the watchdog if it has left already; never waits for it
    /// (it starts as a whole Swift binary: a short command would wait for
    /// that). One still there leaves on its own once it reads the byte,
    /// and is reaped by whoever adopts it when exec exits.
    func reap() {
        var status: Int32 = 0
        _ = waitpid(pid, &status, WNOHANG)
    }

    /// The watchdog's whole life (never returns): waits on descriptor 3,
    /// then kills the group if exec went without a word.
    static func watch(_ arguments: [String]) -> Never {
        for number in [SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE] { signal(number, SIG_IGN) }
        guard arguments.count == 2 || arguments.count == 3, var group = pid_t(arguments[1]), group > 1 || group == 0 else {
            FileHandle.standardError.write(Data("warrant: \(argument) is for warrant exec's own use\n".utf8))
            exit(2)
        }
        // A directory not of exec's shape is not removed; the group is still watched.
        let directory = arguments.count == 3 ? privateDirectory(arguments[2]) : nil
        var byte: UInt8 = 0
        func next() -> Int {
            var count = read(3, &byte, 1)
            while count < 0 && errno == EINTR { count = read(3, &byte, 1) }
            return count
        }
        var count = next()
        // The group, when exec names it (once; a group given as an argument stays).
        while count > 0 && byte == UInt8(ascii: "G") {
            var named: UInt32 = 0
            for shift in stride(from: 0, to: 32, by: 8) {
                count = next()
                guard count > 0 else { break }
                named |= UInt32(byte) << UInt32(shift)
            }
            if count > 0, group == 0, Int32(bitPattern: named) > 1 { group = Int32(bitPattern: named) }
            if count > 0 { count = next() }
        }
        // The end of the pipe before the stand-down byte: exec went without a word.
        if count == 0 && group > 1 { CommandSignals.send(SIGKILL, to: group) }
        guard let directory else { exit(0) }
        // exec lives on after its command (closing the step), or fails
        // before it: until it is gone (the end of the pipe, not a failed read).
        while count > 0 { count = next() }
        if count == 0, let now = privateDirectory(directory.path), now == directory { try? FileManager.default.removeItem(atPath: directory.path) }
        exit(0)
    }

    /// A directory exec made for an identity, and which file it is: an
    /// absolute path without `.` or `..` parts whose last part is
    /// `warrant-exec-` and six characters (mkdtemp's), a real directory
    /// (not a link) of this user's. Nothing else is removed.
    struct PrivateDirectory: Equatable {
        let path: String
        let device: UInt64
        let inode: UInt64
    }

    static func privateDirectory(_ path: String) -> PrivateDirectory? {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        guard path.hasPrefix("/"), !parts.dropFirst().contains(where: { $0.isEmpty || $0 == "." || $0 == ".." }),
              let name = parts.last, name.hasPrefix("warrant-exec-"), name.utf8.count == 19 else { return nil }
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_uid == getuid() else { return nil }
        return PrivateDirectory(path: path, device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }
}
