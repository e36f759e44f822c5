import ArgumentParser

@main
struct QBackup: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "qbackup", abstract: "x")
}
